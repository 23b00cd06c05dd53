"""bfloat16 gradients are rounded to nearest (ties to even), as torch's .to(torch.bfloat16).

Triton's interpreter (3.9) truncates a float32 -> bfloat16 store, so the Triton kernels
round explicitly before the store (row_math.round_to_bf16: the float32 value's bits are
rounded to its top 16, so that the cast that follows is exact on a GPU and in the
interpreter alike). The check: the same kernel on the same values, once with bfloat16
logits and once with float32 ones (every bfloat16 value is a float32), must give a
bfloat16 gradient equal to the float32 gradient rounded by torch. Truncation would differ
in about half of the elements. (CUDA's kernels read bfloat16 rows with wider vectors than
float32 ones, which changes the order of their sums: not bit-comparable this way.)
"""
import pytest
import torch

import unlearn_ext as ue
from conftest import BACKEND_DEVICES

PAIRS = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in BACKEND_DEVICES if p[0] in ("cpu", "triton")]
OPS = {
    "cross_entropy": lambda x, t, y, **k: ue.cross_entropy(x, y, **k),
    "forward_kl": lambda x, t, y, **k: ue.forward_kl(x, t, y, **k),
    "jsd": lambda x, t, y, **k: ue.jsd(x, t, y, beta=0.3, **k),
}


@pytest.mark.parametrize("backend", PAIRS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("reduction", ["none", "mean"])  # the backward kernel; the gradient written in the forward
def test_bf16_gradient_is_rounded_to_nearest(backend, op, reduction, seed):
    name, device = backend
    x = (torch.randn(6, 1031) * 3).to(torch.bfloat16).to(device)
    t = (torch.randn(6, 1031) * 3).to(torch.bfloat16).to(device)
    y = torch.randint(0, 1031, (6,), device=device)
    up = torch.randn(6, device=device)

    def grad(logits):
        leaf = logits.clone().requires_grad_(True)
        out = OPS[op](leaf, t.to(logits.dtype), y, backend=name, reduction=reduction)
        ((out * up).sum() if reduction == "none" else out).backward()
        return leaf.grad

    g16, g32 = grad(x), grad(x.float())
    expected = g32.to(torch.bfloat16)
    assert (g32 != g32.to(torch.bfloat16).float()).float().mean() > 0.9, "the case must need rounding"
    assert torch.equal(g16, expected), (
        f"{int((g16 != expected).sum())} of {g16.numel()} bf16 gradient elements differ from round-to-nearest")
