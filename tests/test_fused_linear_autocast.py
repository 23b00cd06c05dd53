"""Autocast with a float32 head (issue 12.4): mixed-precision training keeps fp32 master
weights, and under autocast F.linear runs the matmul in the autocast dtype with the
gradient flowing back to the fp32 weight in fp32. Every fused-linear loss must do the same:
its loss and its fp32 weight's gradient match F.linear under autocast followed by the
eager row op."""
import pytest
import torch
import torch.nn.functional as F

import unlearn_ext as ue

pytestmark = pytest.mark.as_users_run  # no test-only switches (tests/conftest.py)

B, T, H, V = 2, 6, 16, 50
DTYPE = torch.bfloat16


def _inputs():
    hidden = torch.randn(B, T, H).to(DTYPE)  # activations already bf16, as under autocast
    weight = torch.randn(V, H) / H**0.5  # fp32 master weights
    bias = torch.randn(V) * 0.1
    teacher = (torch.randn(B, T, H).to(DTYPE), torch.randn(V, H) / H**0.5)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    return hidden, weight, bias, teacher, labels


# (fused loss, eager loss on logits): both called as f(head_or_logits, teacher, labels).
CASES = {
    "cross_entropy": (lambda h, w, b, t, y: ue.fused_linear_cross_entropy(h, w, y, bias=b),
                      lambda z, tz, y: ue.cross_entropy(z, y)),
    "token_logprob": (lambda h, w, b, t, y: ue.fused_linear_token_logprob(h, w, y, bias=b, reduction="sum"),
                      lambda z, tz, y: ue.token_logprob(z, y, reduction="sum")),
    "forward_kl": (lambda h, w, b, t, y: ue.fused_linear_forward_kl(h, w, t, y, bias=b),
                   lambda z, tz, y: ue.forward_kl(z, tz, y)),
    "reverse_kl": (lambda h, w, b, t, y: ue.fused_linear_reverse_kl(h, w, t, y, bias=b),
                   lambda z, tz, y: ue.reverse_kl(z, tz, y)),
    "rkld": (lambda h, w, b, t, y: ue.fused_linear_rkld(h, w, t, t, y, bias=b),
             lambda z, tz, y: ue.rkld(z, tz, tz, y)),
    "undial": (lambda h, w, b, t, y: ue.fused_linear_undial(h, w, t, y, bias=b),
               lambda z, tz, y: ue.undial(z, tz, y)),
    "jsd": (lambda h, w, b, t, y: ue.fused_linear_jsd(h, w, t, y, bias=b, beta=0.3),
            lambda z, tz, y: ue.jsd(z, tz, y, beta=0.3)),
    "npo": (lambda h, w, b, t, y: ue.fused_linear_npo(h, w, y, torch.full((B,), -40.0), bias=b),
            lambda z, tz, y: ue.npo_loss(z, y, torch.full((B,), -40.0))),
    "simnpo": (lambda h, w, b, t, y: ue.fused_linear_simnpo(h, w, y, bias=b),
               lambda z, tz, y: ue.simnpo_loss(z, y)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_head_under_autocast_matches_f_linear(name, seed):
    fused, eager = CASES[name]
    hidden, weight, bias, (t_hidden, t_weight), labels = _inputs()
    results = []
    for use_fused in (True, False):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=DTYPE):
            if use_fused:
                loss = fused(h, w, b, ue.LMHeadInputs(t_hidden, t_weight), labels)
            else:
                logits, teacher_logits = F.linear(h, w, b), F.linear(t_hidden, t_weight)
                assert logits.dtype == DTYPE
                loss = eager(logits, teacher_logits, labels)
        grads = torch.autograd.grad(loss, (h, w, b))
        assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32  # to the master weights
        results.append((loss.float().detach(), *(g.float() for g in grads)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_mixed_dtypes_without_autocast_still_raise():
    hidden, weight, _, _, labels = _inputs()
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        ue.fused_linear_cross_entropy(hidden, weight, labels)
