"""The backward of a gradient written during the forward: grad *= g, nothing when g == 1,
decided where g lives (unlearn_ext/ops/_grad_scale.py). The kernel backends' scale ops
against a float64 product; g == 1 must leave every element as it was (NaN included: the
kernel does not even rewrite them)."""
import pytest
import torch

import unlearn_ext as ue
from unlearn_ext._backends import _kernels
from unlearn_ext.ops._grad_scale import scale_grad_

from conftest import KERNEL_BACKEND_DEVICES, backend_params


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKEND_DEVICES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [1.0, 2.5, -0.3, 0.0])
def test_scale_kernels(backend, dtype, g, seed):
    name, device = backend
    grad = torch.randn(3, 4099, device=device).to(dtype)
    grad[0, 5] = float("nan")
    expected = grad.double() * g if g != 1 else grad.clone()
    _kernels(name).scale_grad(grad, torch.tensor(g, device=device))
    if g == 1:
        assert torch.equal(grad.isnan(), expected.isnan()) and torch.equal(grad.nan_to_num(), expected.nan_to_num())
    else:
        torch.testing.assert_close(grad, expected.to(dtype), equal_nan=True)  # one rounding in dtype


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKEND_DEVICES))
def test_scale_kernels_on_every_element(backend):
    """Sizes around the kernels' blocks: no element left out, none written twice."""
    name, device = backend
    for n in (1, 4095, 4096, 4097, 3 * 4096 + 5):
        grad = torch.arange(n, device=device, dtype=torch.float32)
        _kernels(name).scale_grad(grad, torch.tensor(3.0, device=device))
        torch.testing.assert_close(grad, 3 * torch.arange(n, device=device, dtype=torch.float32))


def test_reference_backend_multiplies(seed):
    grad = torch.randn(5, 7)
    expected = grad * 0.5
    assert scale_grad_(None, grad, torch.tensor(0.5))
    torch.testing.assert_close(grad, expected)
    assert not scale_grad_(None, grad, torch.tensor(1.0))  # eager CPU: decided on the host, nothing done
    torch.testing.assert_close(grad, expected)


@pytest.mark.skipif(not ue.backends()["cpu"].available, reason="needs the C++ CPU extension")
def test_scale_op_refuses_bad_scales():
    grad = torch.randn(4, 4)
    with pytest.raises(ValueError, match="one element"):
        torch.ops.unlearn_ext.scale_grad(grad, torch.ones(2))
    with pytest.raises(ValueError, match="scale"):
        torch.ops.unlearn_ext.scale_grad(grad, torch.ones((), device="meta"))
