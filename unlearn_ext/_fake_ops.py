"""Fake (meta) implementations of the registered row ops, so that torch.compile and
FakeTensor tracing see their output shapes without running a kernel."""
from __future__ import annotations

import torch

NUM_STATS = 5  # per-row float statistics every row op saves (csrc/common/row_math.h, kNumStats)
_registered = False


def _check_devices(logits, **tensors):
    """One device for every tensor of a call. A real tensor mixed with a meta one sends a
    call here rather than to a kernel: without this check it would return uninitialised
    memory as a result. (The kernels' bindings check the same for real tensors.)"""
    for name, t in tensors.items():
        if t is not None and t.device != logits.device:
            raise ValueError(f"unlearn_ext: {name} must be on the device of logits ({logits.device}), got {t.device}")


def _outputs(op, logits):
    rows = logits.numel() // logits.shape[-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(rows, dtype=dtype), logits.new_empty((rows, NUM_STATS), dtype=dtype)


def register_fakes() -> None:
    """Registers the fakes once; called after the extension that defines the schemas loads."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("unlearn_ext::row_loss_forward")
    def _forward(op, logits, teacher, teacher2, labels, ignore_index, params):
        _check_devices(logits, teacher=teacher, teacher2=teacher2, labels=labels)
        return _outputs(op, logits)

    @torch.library.register_fake("unlearn_ext::row_loss_forward_with_grad")
    def _forward_with_grad(op, logits, teacher, teacher2, labels, ignore_index, params, grad, grad_scale):
        _check_devices(logits, teacher=teacher, teacher2=teacher2, labels=labels, grad=grad, grad_scale=grad_scale)
        return _outputs(op, logits)

    @torch.library.register_fake("unlearn_ext::row_loss_backward")
    def _backward(op, logits, teacher, teacher2, labels, stats, grad_rows, ignore_index, params, grad):
        _check_devices(logits, teacher=teacher, teacher2=teacher2, labels=labels, stats=stats, grad_rows=grad_rows,
                       grad=grad)
        return None

    @torch.library.register_fake("unlearn_ext::scale_grad")
    def _scale_grad(grad, scale):
        _check_devices(grad, scale=scale)
        return None
