"""From the public arguments of a fused-linear loss to a checked ChunkPlan and its call."""
from __future__ import annotations

from typing import Callable

import torch

from .._backends import resolve
from ..ops._checks import check_finite, check_reduction, host_reads_are_free
from ..ops._row_loss import RowParams, grad_scale_tensor
from ._chunked import ChunkPlan, FusedLinearLoss, default_chunk_rows, evaluate
from ._inputs import LMHeadInputs, Rows, autocast_heads, check_fused_labels, check_head

# Arranges the rows read (flat row numbers, None = all rows in order) into a reading order
# and chunk bounds, given the rows per chunk: (index, count, chunk) -> (index, bounds).
Arrange = Callable[[torch.Tensor | None, int, int], tuple[torch.Tensor | None, list[tuple[int, int]]]]


def _even(index, count, chunk):
    return index, Rows.even_bounds(count, chunk)


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return chunk_size


def _bytes_per_row(student: LMHeadInputs, teachers, reference: bool) -> int:
    """Bytes one row of a chunk holds: its logits, its teachers', the softcap derivative,
    and the float32 temporaries of the torch reference."""
    vocab = student.weight.shape[0]
    per_vocab = student.hidden.element_size() * (2 if student.softcap is not None else 1)
    per_vocab += sum(t.hidden.element_size() for t in teachers)
    return vocab * (per_vocab + (16 if reference else 0))


def prepare(op: str, student, teachers, labels, *, labels_required: bool, reference_fn, ignore_index: int,
            temperature: float, backend: str | None, chunk_size: int | None, alpha: float = 0.0,
            gamma: float = 0.0, arrange: Arrange = _even, **options) -> tuple[LMHeadInputs, ChunkPlan]:
    """Checks every argument (errors name it) and builds the plan of one call.

    ``student``: (hidden, weight, bias, softcap); ``teachers``: (argument name, head) pairs.
    On eager CPU tensors, rows whose label is ``ignore_index`` are left out of the loop
    (counting them on the host is free). Elsewhere (GPUs, torch.compile, CUDA graphs) every
    row is read and the kernels give ignored rows a zero value and gradient: no host
    synchronisation and no data-dependent shape, at the price of the ignored rows' matmuls.
    ``options``: further RowParams fields (label_smoothing, lse_square_scale, beta), checked
    by the caller; the softcap is applied to the chunk logits here, not by the kernels."""
    autocast = _autocast_on(student)
    student = check_head(student, "", mixed_dtypes=autocast)
    named_teachers = teachers
    teachers = [check_head(t, name, like=student, mixed_dtypes=autocast) for name, t in teachers]
    temperature = check_finite("temperature", temperature, positive=True)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    flat_labels = check_fused_labels(labels, student, ignore_index, labels_required)
    chunk_size = check_chunk_size(chunk_size)
    if autocast:  # cast as F.linear would, then hold the heads to one dtype each
        student, *teachers = autocast_heads([student, *teachers])
        student = check_head(student, "")
        teachers = [check_head(t, name, like=student) for (name, _), t in zip(named_teachers, teachers)]
    kernels = resolve(backend, student.hidden.device)

    index = None
    count = student.hidden.shape[:-1].numel()
    counted_rows = count  # the mean's divisor: rows whose label counts (a device tensor off the host)
    if flat_labels is not None:
        counted = flat_labels != ignore_index
        if host_reads_are_free(flat_labels):
            if not bool(counted.all()):
                index = counted.nonzero().squeeze(1)
                count = index.numel()
            counted_rows = count
        else:
            counted_rows = counted.sum()
    vocab, hidden_size = student.weight.shape
    chunk = chunk_size or default_chunk_rows(vocab, hidden_size, _bytes_per_row(student, teachers, kernels is None),
                                             student.hidden.device)
    index, bounds = arrange(index, count, chunk)
    rows = Rows(student.hidden.shape[:-1], index, bounds)
    plan = ChunkPlan(
        op=op, params=RowParams(ignore_index, 1.0 / temperature, float(alpha), float(gamma), **options), kernels=kernels,
        reference_fn=reference_fn, rows=rows,
        labels=None if flat_labels is None else rows.gather(flat_labels.view(rows.lead_shape)),
        teachers=tuple(LMHeadInputs(t.hidden.detach(), t.weight.detach(),
                                    None if t.bias is None else t.bias.detach(), t.softcap) for t in teachers),
        softcap=student.softcap,
        value_dtype=torch.float64 if student.hidden.dtype == torch.float64 else torch.float32,
        counted_rows=counted_rows)
    return student, plan


def _autocast_on(head) -> bool:
    """Whether autocast is on for the device of a (not yet checked) head's hidden states."""
    hidden = head[0] if isinstance(head, tuple) and head else None
    if not isinstance(hidden, torch.Tensor):
        return False
    device_type = hidden.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class Reduce:
    """The sum, or the mean over counted rows, of the per-row values (0 when none counts).
    ``divisor``: an int, or a device tensor (counted without a host synchronisation);
    ``upstream``: the chunks' gradient scale, a one-element tensor on ``device``."""

    def __init__(self, divisor, device: torch.device):
        self.divisor = divisor.clamp(min=1) if isinstance(divisor, torch.Tensor) else max(divisor, 1)
        self.upstream = grad_scale_tensor("mean", self.divisor, device)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum() / self.divisor


def row_loss(op: str, hidden, weight, teachers, labels, *, bias, softcap, labels_required: bool, reference_fn,
             ignore_index: int, temperature: float, reduction: str, backend, chunk_size, alpha: float = 0.0,
             gamma: float = 0.0, **options) -> torch.Tensor:
    """A row op of unlearn_ext.ops on logits that are never materialised."""
    check_reduction(reduction)
    student, plan = prepare(op, (hidden, weight, bias, softcap), teachers, labels, labels_required=labels_required,
                            reference_fn=reference_fn, ignore_index=ignore_index, temperature=temperature,
                            backend=backend, chunk_size=chunk_size, alpha=alpha, gamma=gamma, **options)
    objective = None if reduction == "none" else Reduce(plan.counted_rows if reduction == "mean" else 1,
                                                         student.hidden.device)
    return apply(student, plan, objective)


def apply(student: LMHeadInputs, plan: ChunkPlan, objective) -> torch.Tensor:
    """The loss: with a graph when a gradient can be asked for, else values only."""
    differentiable = (x for x in (student.hidden, student.weight, student.bias) if x is not None)
    if torch.is_grad_enabled() and any(x.requires_grad for x in differentiable):
        return FusedLinearLoss.apply(student.hidden, student.weight, student.bias, plan, objective)
    return evaluate(plan, student.hidden, student.weight, student.bias, objective)
