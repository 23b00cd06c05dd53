"""The autograd Function behind every row op, and the dispatch from a public op to a backend.

All six row ops share one contract (DESIGN.md, "Forward and backward"): the forward reads
each row once and saves only per-row statistics; the backward reads the row again and
writes the gradient, optionally over the logits. So they share this Function and differ
only in the kernel op they name; each op's own file holds its public function, its
nn.Module and its reference.

Reductions happen inside the Function so that the kernels can write the gradient during
the forward (one walk over a row from memory instead of two) for sum/mean, on every kernel
backend and device, without a host synchronisation: the mean's divisor stays on the device
and the kernel reads it there; the backward scales by the upstream gradient on the device
(nothing when it is 1; see _grad_scale.py). A per-row upstream gradient (reduction="none")
and inplace_backward go through the exact backward kernel.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from .._backends import _kernels, resolve
from ._checks import check_finite, check_labels, check_logits, check_reduction, check_teacher, tracing
from ._grad_scale import scale_grad_
from ._huge_pages import advise_huge_pages, pooled_grad_buffer


class RowParams(NamedTuple):
    ignore_index: int = reference.IGNORE_INDEX
    inv_temperature: float = 1.0
    alpha: float = 0.0  # RKLD
    gamma: float = 0.0  # UnDIAL
    label_smoothing: float = 0.0  # cross_entropy
    lse_square_scale: float = 0.0  # cross_entropy's z-loss
    softcap: float = 0.0  # student logits c·tanh(z / c); 0: none
    beta: float = 0.5  # jsd

    def scalars(self) -> list[float]:
        """The kernels' `float[] params`, in the order of csrc/common/row_args.h (set_params)."""
        return [float(x) for x in self[1:]]


def new_grad_buffer(like: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """A gradient buffer for the kernels; NaN-filled under UNLEARN_EXT_POISON=1 (the tests)
    so that an element a kernel fails to write shows up. ``pooled``: the row ops' [N, V]
    gradient, which a training step frees before the next one asks again; on the CPU it
    reuses that memory (pooled_grad_buffer) instead of faulting in fresh pages each call."""
    if os.environ.get("UNLEARN_EXT_POISON") == "1":
        return torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device)
    buffer = pooled_grad_buffer(like) if pooled else None
    if buffer is not None:
        return buffer
    return advise_huge_pages(torch.empty(like.shape, dtype=like.dtype, device=like.device))


def _kernel_view(x: torch.Tensor) -> torch.Tensor:
    """A 2-D or 3-D tensor with unit stride on V; kernels read [B, T, V] slices such as
    logits[:, :-1] in place, so only a >3-D tensor or a strided V is copied."""
    if x.dim() > 3:
        x = x.reshape(-1, *x.shape[-2:])
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _rows_disjoint(x: torch.Tensor) -> bool:
    """True when no two rows of x share memory; the C++ bindings refuse a gradient buffer
    without it (csrc/torch_row_args.h, rows_disjoint), so an expanded tensor is never
    written in place."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim() - 1) if x.shape[d] > 1)
    extent = x.shape[-1]
    for stride, size in dims:
        if stride < extent:
            return False
        extent += stride * (size - 1)
    return True


def mean_divisor(labels: torch.Tensor | None, ignore_index: int, rows: int) -> torch.Tensor | int:
    """The divisor of a mean, at least 1: the counted labels as a device tensor (counting
    them on the host would be a synchronisation), else the number of rows."""
    if labels is None:
        return max(rows, 1)
    return (labels != ignore_index).sum().clamp_(min=1)


def grad_scale_tensor(reduction: str, divisor, device: torch.device) -> torch.Tensor:
    """The fused forward's gradient scale on the device, float64: 1 for a sum, 1/divisor for
    a mean. torch.full is a fill kernel, not a copy from the host: legal in CUDA-graph capture."""
    if reduction == "mean" and isinstance(divisor, torch.Tensor):
        return divisor.to(torch.float64).reciprocal()
    scale = 1.0 / divisor if reduction == "mean" else 1.0
    return torch.full((), scale, dtype=torch.float64, device=device)


def _reduce_rows(values, reduction, divisor):
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / divisor


class RowLossFunction(torch.autograd.Function):
    """The loss, and with ``return_z_loss`` (cross_entropy) also its z-loss part
    lse_square_scale·lse², reduced alike: taken from the saved statistics (log-sum-exp =
    stats 0 + 1), for logging, without a gradient of its own (as Liger's)."""

    @staticmethod
    def forward(ctx, logits, teacher, teacher2, labels, op: str, params: RowParams, reduction: str,
                backend: str, inplace: bool, return_z_loss: bool = False):
        kernels = _kernels(backend)
        rows = logits.numel() // logits.shape[-1]
        divisor = mean_divisor(labels, params.ignore_index, rows) if reduction == "mean" else 1
        ctx.op, ctx.params, ctx.reduction, ctx.backend, ctx.inplace = op, params, reduction, backend, inplace
        ctx.divisor = divisor if not isinstance(divisor, torch.Tensor) else None
        # In place, the gradient is written in the backward, once every forward that reads
        # the logits has run; the fused path would overwrite them under later readers' feet.
        ctx.fused = reduction != "none" and kernels.fuses_grad and ctx.needs_input_grad[0] and not inplace
        ctx.scaled = False
        if ctx.fused:
            grad = new_grad_buffer(logits, pooled=True)
            values, stats = kernels.forward_with_grad(op, logits, teacher, teacher2, labels, params, grad,
                                                      grad_scale_tensor(reduction, divisor, logits.device))
            ctx.save_for_backward(grad)
        else:
            values, stats = kernels.forward(op, logits, teacher, teacher2, labels, params)
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(logits, teacher, teacher2, labels, stats,
                                      divisor if ctx.divisor is None else None)
        out = _reduce_rows(values, reduction, divisor)
        if not return_z_loss:
            return out.reshape(logits.shape[:-1]) if reduction == "none" else out
        z = _reduce_rows(params.lse_square_scale * (stats[:, 0] + stats[:, 1]) ** 2, reduction, divisor)
        ctx.mark_non_differentiable(z)
        if reduction == "none":
            return out.reshape(logits.shape[:-1]), z.reshape(logits.shape[:-1])
        return out, z

    @staticmethod
    @once_differentiable
    def backward(ctx, g, *z_loss_grad):
        nones = (None,) * 9
        if ctx.fused:
            if ctx.scaled:
                raise RuntimeError(
                    f"unlearn_ext: {ctx.op} wrote its gradient during the forward (reduction={ctx.reduction!r}) and "
                    "a first backward scaled it in place (off the CPU: may have, decided on the device); a second "
                    "backward through the same graph (retain_graph=True) is not supported. Use reduction='none' "
                    "and reduce the result yourself.")
            (grad,) = ctx.saved_tensors
            # The forward wrote the gradient for an upstream gradient of 1.
            ctx.scaled = scale_grad_(_kernels(ctx.backend), grad, g)
            return (grad,) + nones
        logits, teacher, teacher2, labels, stats, count = ctx.saved_tensors
        count = ctx.divisor if count is None else count
        rows = stats.shape[0]
        g = g.to(stats.dtype)
        if ctx.reduction == "none":
            grad_rows = g.reshape(-1).contiguous()
        elif ctx.reduction == "sum":
            grad_rows = g.expand(rows).contiguous()
        else:
            grad_rows = (g / count).expand(rows).contiguous()
        grad = logits if ctx.inplace else new_grad_buffer(logits, pooled=True)
        _kernels(ctx.backend).backward(ctx.op, logits, teacher, teacher2, labels, stats, grad_rows, ctx.params, grad)
        if ctx.inplace:
            # The kernel wrote through a raw pointer: tell autograd, so that every other
            # node that saved these logits raises instead of reading a gradient.
            torch.autograd.graph.increment_version(logits)
        return (grad,) + nones


def row_loss(
    op: str,
    logits: torch.Tensor,
    teachers: tuple[tuple[str, torch.Tensor], ...],
    labels: torch.Tensor | None,
    *,
    labels_required: bool,
    reference_fn: Callable[..., torch.Tensor],
    ignore_index: int,
    temperature: float,
    reduction: str,
    backend: str | None,
    inplace_backward: bool,
    alpha: float = 0.0,
    gamma: float = 0.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    beta: float = 0.5,
    z_loss_fn: Callable[..., torch.Tensor] | None = None,
):
    """Checks the arguments of a row op and runs it on the chosen backend.

    ``teachers`` are (argument name, tensor) pairs; ``reference_fn(logits, *teachers,
    labels)`` gives the per-row values of the torch backend. With ``z_loss_fn(logits,
    labels)`` (the torch backend's per-row z-loss) it returns (loss, z_loss).
    """
    check_logits(logits)
    for name, teacher in teachers:
        check_teacher(teacher, logits, name)
    check_reduction(reduction)
    temperature = check_finite("temperature", temperature, positive=True)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    flat_labels = check_labels(labels, logits, ignore_index, required=labels_required)

    kernels = resolve(backend, logits.device)
    if kernels is None:
        values = reference_fn(logits, *(t for _, t in teachers), labels)
        out = reference.reduce(values, labels, ignore_index=ignore_index, reduction=reduction)
        if z_loss_fn is None:
            return out
        with torch.no_grad():
            return out, reference.reduce(z_loss_fn(logits, labels), labels, ignore_index=ignore_index,
                                         reduction=reduction)

    params = RowParams(ignore_index, 1.0 / temperature, float(alpha), float(gamma), float(label_smoothing),
                       float(lse_square_scale), float(softcap or 0.0), float(beta))
    teacher_views = [_kernel_view(t.detach()) for _, t in teachers] + [None] * (2 - len(teachers))
    view = _kernel_view(logits)
    # Rows that share memory (an expanded tensor) cannot each hold their own gradient:
    # such logits get a fresh buffer.
    inplace = bool(inplace_backward) and not tracing() and _rows_disjoint(view)
    out = RowLossFunction.apply(view, teacher_views[0], teacher_views[1], flat_labels, op, params, reduction,
                                kernels.name, inplace, z_loss_fn is not None)
    if z_loss_fn is None:
        return out.reshape(logits.shape[:-1]) if reduction == "none" else out
    return tuple(x.reshape(logits.shape[:-1]) if reduction == "none" else x for x in out)


class RowLossModule(torch.nn.Module):
    """Base of the thin nn.Module wrappers: holds the keyword arguments of its op."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
