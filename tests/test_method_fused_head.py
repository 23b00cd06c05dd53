"""The fused-linear head passes hidden states, head weights and teachers where the
documented ``fused_linear_<op>`` API expects them. The fused ops themselves come from
another part of the library; here a stand-in builds the logits with F.linear and calls
the logits ops, so any wiring mistake (wrong teacher, unshifted rows, lost option) shows
as a difference from the logits head."""
import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import one_thread, perturbed, setup_method  # noqa: F401

import unlearn_ext
from unlearn_ext import ops
from unlearn_ext.methods import METHODS, RKLD, FusedLinearHead, LogitsHead, Method, freeze, make_head

OPS = ["cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial", "sequence_logprob", "ga_loss", "retain_loss",
       "npo_loss", "simnpo_loss"]


def hidden_and_head(model, input_ids, attention_mask):
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    head = model.get_output_embeddings()
    return out.hidden_states[-1], head.weight, head.bias, None


def stand_in(op):
    def fused(hidden, weight, labels, *, bias=None, softcap=None, backend=None, teacher_hidden=None,
              teacher_weight=None, teacher_bias=None, teacher2_hidden=None, teacher2_weight=None, teacher2_bias=None,
              **options):
        assert softcap is None
        logits = F.linear(hidden, weight, bias)
        teachers = [F.linear(h, w, b) for h, w, b in ((teacher_hidden, teacher_weight, teacher_bias),
                                                      (teacher2_hidden, teacher2_weight, teacher2_bias)) if h is not None]
        fn = getattr(ops, op)
        if op == "retain_loss":
            return fn(logits, labels, *teachers, backend=backend)
        if teachers:
            return fn(logits, *teachers, labels, backend=backend, **options)
        return fn(logits, labels, backend=backend, **options)
    return fused


@pytest.fixture
def fused_api(monkeypatch):
    monkeypatch.setattr(unlearn_ext, "causal_lm_hidden_and_head", hidden_and_head, raising=False)
    for op in OPS:
        monkeypatch.setattr(unlearn_ext, f"fused_linear_{op}", stand_in(op), raising=False)


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


def test_make_head_prefers_the_fused_path_where_installed(fused_api):
    assert isinstance(make_head(), FusedLinearHead)
    assert type(make_head(fused=False)) is LogitsHead


def test_forcing_a_missing_fused_path_says_so(monkeypatch):
    if hasattr(unlearn_ext, "fused_linear_cross_entropy"):
        monkeypatch.delattr(unlearn_ext, "fused_linear_cross_entropy")
    assert type(make_head()) is LogitsHead
    with pytest.raises(RuntimeError, match="not installed"):
        make_head(fused=True)
