"""The fused-linear head gives every method the loss and the gradients of the logits head:
hidden states, head weights and teachers reach ``fused_linear_<op>`` where they belong,
rows are shifted once, no option is lost."""
import copy

import pytest
import torch
from tiny_lm import one_thread, perturbed, setup_method  # noqa: F401

from unlearn_ext.methods import METHODS, RKLD, FusedLinearHead, LogitsHead, Method, freeze, make_head


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fused_head_gives_the_logits_head_loss_and_gradients(monkeypatch, name):
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
    params = [p for p in m.models.student.parameters() if p.requires_grad]

    def loss_and_grads(head):
        m.head = head
        torch.manual_seed(0)  # idkdpo draws its refusals
        loss, logs = m.loss(m._test_batch)
        return loss, logs, torch.autograd.grad(loss, params, allow_unused=True)

    want, want_logs, want_grads = loss_and_grads(LogitsHead())
    got, got_logs, got_grads = loss_and_grads(FusedLinearHead())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_logs.keys() == want_logs.keys()
    assert sum(g is not None for g in want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_make_head_prefers_the_fused_path_in_one_process_and_under_ddp(monkeypatch):
    assert isinstance(make_head(), FusedLinearHead)
    assert type(make_head(fused=False)) is LogitsHead
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: the loss runs inside the wrapped forward
    assert isinstance(make_head(), FusedLinearHead)
