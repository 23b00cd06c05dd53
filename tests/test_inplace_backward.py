"""inplace_backward=True writes the gradient over the logits: autograd must see that write,
so that any other use of the overwritten logits raises instead of reading a gradient as if
it were logits (issue 12.1: shared logits gave a gradient off by 0.04, or a wrong one)."""
import pytest
import torch

import unlearn_ext as ue
from conftest import KERNEL_BACKEND_DEVICES, backend_params

INPLACE_ERROR = "modified by an inplace operation"


def _exact_or_raises(loss, leaf, expected):
    """Autograd runs the later nodes' backwards first: a node that read the logits before
    the overwrite gives its exact gradient, one after it must raise. Never a wrong one."""
    try:
        (grad,) = torch.autograd.grad(loss, leaf)
    except RuntimeError as exc:
        assert INPLACE_ERROR in str(exc)
        return False
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    return True


def _inputs(device):
    leaf = torch.randn(3, 5, 37, device=device, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.randint(0, 37, (3, 5), device=device)
    labels[0, :2] = -100
    teacher = torch.randn(3, 5, 37, device=device)
    return leaf, labels, teacher


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKEND_DEVICES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shared_logits_with_another_row_op_raise(backend, reduction, seed):
    name, device = backend
    leaf, labels, teacher = _inputs(device)
    logits = leaf * 1.0
    ce = ue.cross_entropy(logits, labels, backend=name, reduction=reduction, inplace_backward=True)
    kl = ue.forward_kl(logits, teacher, labels, backend=name, reduction=reduction)
    expected = torch.autograd.grad(
        (ue.cross_entropy(leaf * 1.0, labels, backend="torch", reduction=reduction)
         + ue.forward_kl(leaf * 1.0, teacher, labels, backend="torch", reduction=reduction)).sum(), leaf)[0]
    _exact_or_raises((ce + kl).sum(), leaf, expected)
    # The same two losses in the other order: the KL's backward (kernel path: it saved the
    # logits) now runs after the overwrite.
    logits = leaf * 1.0
    kl = ue.forward_kl(logits, teacher, labels, backend=name, reduction=reduction, inplace_backward=True)
    ce = ue.cross_entropy(logits, labels, backend=name, reduction=reduction)
    _exact_or_raises((ce + kl).sum(), leaf, expected)


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKEND_DEVICES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_also_used_by_a_torch_op(backend, reduction, seed):
    name, device = backend
    leaf, labels, _ = _inputs(device)
    logits = leaf * 1.0
    loss = ue.cross_entropy(logits, labels, backend=name, reduction=reduction, inplace_backward=True).sum()
    loss = loss + (logits * logits).sum()  # mul saves the logits for its backward (run first)
    x = leaf.detach().requires_grad_(True)
    expected = torch.autograd.grad(
        ue.cross_entropy(x, labels, backend="torch", reduction=reduction).sum() + (x * x).sum(), x)[0]
    _exact_or_raises(loss, leaf, expected)


@pytest.mark.parametrize("backend", backend_params(KERNEL_BACKEND_DEVICES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_saved_before_the_loss_raise(backend, reduction, seed):
    name, device = backend
    leaf, labels, teacher = _inputs(device)
    logits = leaf * 1.0
    square = (logits * logits).sum()  # mul saved the logits; its backward runs after the loss's
    loss = ue.cross_entropy(logits, labels, backend=name, reduction=reduction, inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        torch.autograd.grad(loss + square, leaf)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_use_gives_the_exact_gradient(backend, reduction, seed):
    name, device = backend
    leaf, labels, teacher = _inputs(device)
    logits = leaf * 1.0
    out = ue.forward_kl(logits, teacher, labels, backend=name, reduction=reduction, inplace_backward=True)
    upstream = torch.randn(out.shape, device=device) if reduction == "none" else torch.tensor(1.7, device=device)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    x = leaf.detach().double().requires_grad_(True)
    ref = ue.forward_kl(x, teacher.double(), labels, backend="torch", reduction=reduction)
    (expected,) = torch.autograd.grad(ref, x, upstream.double())
    torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-6)
