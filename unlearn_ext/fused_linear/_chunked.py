"""The chunked loop behind every fused-linear loss, and its autograd Function.

For each chunk of rows: the student's logits ``z = h·Wᵀ + b`` (softcapped), the teachers'
logits under no-grad, then the active backend's row kernel turns ``z`` into the gradient
``G = ∂loss/∂z`` in place, and ``d_hidden = G·W``, ``d_weight += Gᵀ·h`` (float32
accumulation), ``d_bias += Σ G`` are taken before the next chunk. Peak extra memory: one
chunk of logits (and its teacher chunks) plus the weight-gradient accumulator, whatever N.

Three ways to get the upstream gradient of a chunk's rows:
* a constant known before the loss (``sum``/``mean``, a one-element tensor on the device:
  the mean's divisor is never read on the host): the gradient is formed in the forward
  (kernels that fuse it write it during their one walk over a row), the backward only
  scales it by the caller's gradient, on the device (nothing when it is 1);
* a function of the chunk's own per-row values (sequence losses whose chunks hold whole
  sequences, e.g. NPO): values first, then the gradient, still in the forward;
* a per-row tensor known only in the backward (``reduction="none"``): the forward keeps
  nothing but its inputs, the backward forms the chunk logits again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch.autograd.function import once_differentiable

from ..ops._checks import tracing
from ..ops._grad_scale import scale_grad_
from ..ops._row_loss import RowParams, new_grad_buffer
from ._inputs import LMHeadInputs, Rows

# A chunk's upstream gradient: a constant (one-element tensor), or rows' gradients from
# (values, start, stop).
Upstream = Union[torch.Tensor, Callable[[torch.Tensor, int, int], torch.Tensor], None]

# Fewest rows per chunk. Each chunk's matmuls pass over the whole [V, H] weight (the BLAS
# packs it for every call) and the float32 weight-gradient accumulator: rows·2 flop per
# weight element against ~8 bytes of traffic, so too few rows make a chunk memory-bound
# (~20 flop/byte balance a CPU, ~300 an H100). Measured on a 2-core Xeon (fp32, V = 32000,
# H = 2048, N = 4096): 512 rows cost as much CPU time as eager PyTorch, 768 rows 4 % less.
MIN_CHUNK_ROWS = {"cpu": 768, "cuda": 1024}
_MIB = 1 << 20


def default_chunk_rows(vocab: int, hidden_size: int, bytes_per_row: int, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits may take an eighth of what a float32 copy of the
    LM head takes (V·H·4/8 bytes; the weight gradient already needs that much), at least
    64 MiB, and never fewer rows than the d_weight matmul needs to stay compute-bound.
    A multiple of 64 (matmul tiles) when that large."""
    budget = max(vocab * hidden_size // 2, 64 * _MIB)
    rows = max(budget // max(bytes_per_row, 1), MIN_CHUNK_ROWS.get(device.type, 768))
    return int(rows // 64 * 64 if rows >= 64 else rows)


@dataclass
class ChunkPlan:
    """Everything about one loss call that is not differentiated."""

    op: str  # the row op (DESIGN.md), e.g. "cross_entropy"
    params: RowParams
    kernels: object | None  # the backend's kernels; None: the torch reference
    reference_fn: Callable[..., torch.Tensor]  # (logits, *teacher_logits, labels) -> per-row values
    rows: Rows
    labels: torch.Tensor | None  # in reading order, int64
    teachers: tuple[LMHeadInputs, ...]  # detached
    softcap: float | None
    value_dtype: torch.dtype  # float64 for float64 hidden, else float32
    counted_rows: int | torch.Tensor  # rows whose label counts: the mean's divisor (a device tensor off the CPU)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def _softcap_(z: torch.Tensor, cap: float | None, keep_derivative: bool) -> torch.Tensor | None:
    """z ← c·tanh(z/c) in place (the model's own rounding order); returns dz_capped/dz =
    1 − tanh² when asked (one chunk-sized buffer, only for softcapped students)."""
    if cap is None:
        return None
    z.div_(cap).tanh_()
    derivative = torch.mul(z, z).neg_().add_(1) if keep_derivative else None
    z.mul_(cap)
    return derivative


def _teacher_logits(plan: ChunkPlan, start: int, stop: int) -> list[torch.Tensor]:
    out = []
    for t in plan.teachers:
        z = _logits(plan.rows.take(t.hidden, start, stop), t.weight, t.bias)
        _softcap_(z, t.softcap, keep_derivative=False)
        out.append(z)
    return out


def _reference_rows(plan, z, teachers, labels, upstream, start, stop):
    """The torch backend: the reference op on the chunk, its gradient by torch.func.vjp
    (which torch.compile traces; torch.autograd.grad would break the graph)."""
    if upstream is None:
        return plan.reference_fn(z, *teachers, labels), None
    values, vjp = torch.func.vjp(lambda x: plan.reference_fn(x, *teachers, labels), z.detach())
    grad_rows = upstream(values, start, stop) if callable(upstream) else _constant_rows(upstream, values)
    (grad,) = vjp(grad_rows.to(values.dtype))
    return values, grad


def _constant_rows(upstream: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The constant upstream gradient as one entry per row (an expanded view)."""
    return upstream.to(values.dtype).reshape(()).expand(values.shape)


def _chunk_rows(plan: ChunkPlan, z, teachers, labels, upstream: Upstream, start: int, stop: int):
    """Per-row values of one chunk and, with an upstream gradient, ∂/∂z (over z when the
    backend's kernels write in place)."""
    k = plan.kernels
    if k is None:
        return _reference_rows(plan, z, teachers, labels, upstream, start, stop)
    t1, t2 = (teachers + [None, None])[:2]
    if upstream is None:
        return k.forward(plan.op, z, t1, t2, labels, plan.params)[0], None
    if not callable(upstream) and k.fuses_grad:
        values, _ = k.forward_with_grad(plan.op, z, t1, t2, labels, plan.params, z, upstream)
        return values, z
    values, stats = k.forward(plan.op, z, t1, t2, labels, plan.params)
    if callable(upstream):
        grad_rows = upstream(values, start, stop).to(stats.dtype).contiguous()
    else:
        grad_rows = _constant_rows(upstream, values).contiguous()
    k.backward(plan.op, z, t1, t2, labels, stats, grad_rows, plan.params, z)
    return values, z


_MIXED_ADDMM: dict[str, bool] = {}


def _mixed_addmm_works(device: torch.device) -> bool:
    """Whether addmm takes bf16/fp16 factors into a float32 accumulator in place
    (``out_dtype``, CUDA in recent torch); checked once per device type on a tiny case."""
    if device.type not in _MIXED_ADDMM:
        if device.type == "meta" or tracing():  # nothing to measure now: the slab loop, always right
            return False
        try:
            a = torch.randn(8, 16, device=device)
            b = torch.randn(16, 4, device=device)
            acc = torch.ones(8, 4, device=device)
            torch.addmm(acc, a.bfloat16(), b.bfloat16(), out_dtype=torch.float32, out=acc)
            expected = 1 + a.bfloat16().float() @ b.bfloat16().float()
            _MIXED_ADDMM[device.type] = bool(torch.allclose(acc, expected, rtol=1e-4, atol=1e-4))
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM[device.type] = False
    return _MIXED_ADDMM[device.type]


def _accumulate_weight_grad(acc: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V, H] += gradᵀ·h. A float32 accumulator for bf16/fp16 factors takes the
    product without a [V, H] temporary: in one matmul where torch can, else by vocabulary
    slabs the size of the chunk."""
    if acc.dtype == grad.dtype:
        acc.addmm_(grad.t(), h)
    elif _mixed_addmm_works(acc.device):
        torch.addmm(acc, grad.t(), h, out_dtype=acc.dtype, out=acc)
    else:
        slab = max(1, grad.numel() // max(h.shape[1], 1))
        for v in range(0, acc.shape[0], slab):
            acc[v:v + slab].add_(torch.mm(grad[:, v:v + slab].t(), h))


@dataclass
class Gradients:
    hidden: torch.Tensor | None  # [rows of hidden, H]
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def run_chunks(plan: ChunkPlan, hidden, weight, bias, upstream: Upstream, needs=(False, False, False)):
    """The loop: per-row values in reading order [rows.count] and, with an upstream
    gradient, the gradients asked for by ``needs`` (hidden, weight, bias)."""
    rows = plan.rows
    values = new_grad_buffer(hidden.new_empty((), dtype=plan.value_dtype).expand(rows.count))
    needs = needs if upstream is not None else (False, False, False)
    accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d_hidden = rows.new_row_buffer(hidden.shape[-1], hidden.dtype, hidden.device) if needs[0] else None
    d_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs[1] else None
    d_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if needs[2] else None
    for start, stop in rows.bounds:
        h = rows.take(hidden, start, stop)
        z = _logits(h, weight, bias)
        derivative = _softcap_(z, plan.softcap, keep_derivative=any(needs))
        with torch.no_grad():
            teachers = _teacher_logits(plan, start, stop)
        labels = None if plan.labels is None else plan.labels[start:stop]
        chunk_values, grad = _chunk_rows(plan, z, teachers, labels, upstream if any(needs) else None, start, stop)
        values[start:stop] = chunk_values
        if grad is not None:
            if derivative is not None:
                grad.mul_(derivative)
            if needs[0]:
                rows.put(d_hidden, start, stop, torch.mm(grad, weight))
            if needs[1]:
                _accumulate_weight_grad(d_weight, grad, h)
            if needs[2]:
                d_bias.add_(grad.sum(0, dtype=accumulate))
        # Free this chunk before the next one is formed: peak memory is one chunk.
        del h, z, derivative, teachers, chunk_values, grad
    if not any(needs):
        return values, None
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return values, Gradients(d_hidden, cast(d_weight, weight), cast(d_bias, weight))


class FusedLinearLoss(torch.autograd.Function):
    """``objective`` None: per-row values (shape rows.lead_shape), gradient pass in the
    backward. Else a scalar: objective(values) → the loss from the per-row values, with
    ``objective.upstream`` the chunks' upstream gradient (a constant or a function of
    their values), the gradients formed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: ChunkPlan, objective):
        ctx.plan, ctx.objective = plan, objective
        needs = tuple(ctx.needs_input_grad[:3])
        if objective is None:
            ctx.save_for_backward(hidden, weight, bias)
            return evaluate(plan, hidden, weight, bias, None)
        with _no_autocast(hidden.device):
            values, grads = run_chunks(plan, hidden, weight, bias, objective.upstream, needs)
        ctx.grads = grads
        return objective(values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        plan = ctx.plan
        if ctx.objective is not None:
            grads, ctx.grads = ctx.grads, None
            # The forward formed the gradients for an upstream gradient of 1.
            for g in (grads.hidden, grads.weight, grads.bias):
                if g is not None:
                    scale_grad_(plan.kernels, g, grad_out)
        else:
            hidden, weight, bias = ctx.saved_tensors
            grad_rows = plan.rows.gather(grad_out).to(plan.value_dtype)
            with _no_autocast(hidden.device):
                _, grads = run_chunks(plan, hidden, weight, bias, lambda v, s, e: grad_rows[s:e],
                                      tuple(ctx.needs_input_grad[:3]))
        d_hidden = None if grads.hidden is None else grads.hidden.view(*plan.rows.lead_shape, grads.hidden.shape[-1])
        return d_hidden, grads.weight, grads.bias, None, None


def evaluate(plan: ChunkPlan, hidden, weight, bias, objective):
    """The loss without gradient work: per-row values (objective None) or objective(values).
    What the Function's forward returns when no gradient is needed (e.g. under no_grad,
    where autograd still reports needs_input_grad)."""
    with _no_autocast(hidden.device), torch.no_grad():
        values, _ = run_chunks(plan, hidden, weight, bias, None)
    return _per_row(plan.rows, values) if objective is None else objective(values)


def _no_autocast(device: torch.device):
    """The loop runs in the dtypes it was given (the public functions applied autocast's
    casts already): a float32 loss must not turn into bf16 matmuls under autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _per_row(rows: Rows, values: torch.Tensor) -> torch.Tensor:
    """Values in reading order → one per row of hidden (0 on rows the loss skipped)."""
    if rows.index is None:
        return values.view(rows.lead_shape)
    out = torch.zeros(rows.total, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, rows.index, values).view(rows.lead_shape)
