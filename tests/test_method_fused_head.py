"""The fused-linear head passes hidden states, head weights and teachers where the
documented ``fused_linear_<op>`` API expects them. The fused ops themselves come from
another part of the library; here a stand-in builds the logits with F.linear and calls
the logits ops, so any wiring mistake (wrong teacher, unshifted rows, lost option) shows
as a difference from the logits head."""
import copy
import sys
import types
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import one_thread, perturbed, setup_method  # noqa: F401

import unlearn_ext
from unlearn_ext import ops
from unlearn_ext.methods import METHODS, RKLD, FusedLinearHead, LogitsHead, Method, freeze, make_head

class LMHeadInputs(NamedTuple):
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def logits(self):
        return F.linear(self.hidden, self.weight, self.bias)


def lm_head_inputs(model, input_ids, attention_mask=None):
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    head = model.get_output_embeddings()
    return LMHeadInputs(out.hidden_states[-1], head.weight, head.bias, None)


def shift_labels(labels):
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def student(fn):
    """A stand-in with the fused API's leading (hidden, weight, …) arguments."""
    def fused(hidden, weight, *args, bias=None, softcap=None, backend=None, **options):
        assert softcap is None
        args = [a.logits() if isinstance(a, LMHeadInputs) else a for a in args]
        return fn(F.linear(hidden, weight, bias), *args, backend=backend, **options)
    return fused


STAND_INS = {
    "fused_linear_cross_entropy": student(ops.cross_entropy),
    "fused_linear_forward_kl": student(lambda z, t, y, **kw: ops.forward_kl(z, t, y, **kw)),
    "fused_linear_reverse_kl": student(lambda z, t, y, **kw: ops.reverse_kl(z, t, y, **kw)),
    "fused_linear_rkld": student(lambda z, o, a, y, **kw: ops.rkld(z, o, a, y, **kw)),
    "fused_linear_undial": student(lambda z, t, y, **kw: ops.undial(z, t, y, **kw)),
    "fused_linear_sequence_logprob": student(ops.sequence_logprob),
    "fused_linear_ga": student(ops.ga_loss),
    "fused_linear_retain": student(ops.retain_loss),
    "fused_linear_npo": student(ops.npo_loss),
    "fused_linear_simnpo": student(ops.simnpo_loss),
}


@pytest.fixture
def fused_api(monkeypatch):
    monkeypatch.setitem(sys.modules, "unlearn_ext.models", types.SimpleNamespace(lm_head_inputs=lm_head_inputs))
    monkeypatch.setattr(unlearn_ext, "LMHeadInputs", LMHeadInputs, raising=False)
    monkeypatch.setattr(unlearn_ext, "shift_labels", shift_labels, raising=False)
    for name, fn in STAND_INS.items():
        monkeypatch.setattr(unlearn_ext, name, fn, raising=False)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fused_head_gives_the_logits_head_loss(fused_api, monkeypatch, name):
    if name == "rkld":
        monkeypatch.setattr(RKLD, "prepare", Method.prepare)
    options = {"retain_loss": "kl"} if name == "graddiff" else {}
    m = setup_method(METHODS[name], **options)
    if name == "rkld":
        m.models.extra["augmented"] = freeze(perturbed(copy.deepcopy(m.models.reference), 0.05, seed=7))
    if name == "eul":
        with torch.no_grad():
            for p in m.layers.parameters():
                p.normal_(0, 0.3)
    want, want_logs = m.loss(m._test_batch)
    m.head = FusedLinearHead()
    got, got_logs = m.loss(m._test_batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_logs.keys() == want_logs.keys()


def test_make_head_prefers_the_fused_path_where_installed(fused_api, monkeypatch):
    assert isinstance(make_head(), FusedLinearHead)
    assert type(make_head(fused=False)) is LogitsHead
    monkeypatch.setenv("WORLD_SIZE", "2")  # not wired for DDP/FSDP yet: the default falls back
    assert type(make_head()) is LogitsHead


def test_forcing_a_missing_fused_path_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "unlearn_ext.models", None)  # import fails
    assert type(make_head()) is LogitsHead
    with pytest.raises(RuntimeError, match="not installed"):
        make_head(fused=True)
