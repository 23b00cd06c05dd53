"""Launchers of the Triton row kernels: the kernel object behind backend "triton".

`KERNELS` has the interface of unlearn_ext._backends.TorchOpKernels (forward,
forward_with_grad, backward); the arguments were validated by the Python layer
(unlearn_ext/ops/_checks.py), so only what is particular to Triton is checked here.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

from .configs import blocks_per_program, config
from .row_kernels import row_backward_kernel, row_forward_kernel
from .scale_kernel import SCALE_BLOCK, scale_kernel
from .row_math import NEEDS_LABEL, OP_CODES

NUM_STATS = 5  # per-row statistics, the layout of csrc/common/row_math.h (kNumStats)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Contract a * b + c into FMAs (Triton's default until 3.10, named so that it stays put):
# faster, and no less accurate for this math.
FP_FUSION = True


def _interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (run on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(row_forward_kernel, InterpretedFunction)


INTERPRETED = _interpreted()


def _new_output(shape, device) -> torch.Tensor:
    """A float32 output buffer; NaN-filled under UNLEARN_EXT_POISON=1 (the tests) so that an
    entry a kernel fails to write shows up."""
    if os.environ.get("UNLEARN_EXT_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _row_view(x: torch.Tensor) -> tuple:
    """(tensor, rows per outer index, inner stride, outer stride): RowView's addressing of a
    2-D [N, V] or 3-D [B, T, V] tensor with unit stride on V."""
    if x.dim() == 2:
        return x, max(x.shape[0], 1), x.stride(0), 0
    return x, max(x.shape[1], 1), x.stride(1), x.stride(0)


def _check(op: str, logits, teacher, teacher2, labels) -> None:
    if op not in OP_CODES:
        raise ValueError(f"unknown row op {op!r}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"the triton backend takes float32, bfloat16 or float16 logits (it computes in float32), "
                        f"got {logits.dtype} logits: use backend='cpu' or 'torch' for float64")
    for name, x in (("logits", logits), ("teacher", teacher), ("teacher2", teacher2)):
        if x is not None and (x.dim() not in (2, 3) or (x.shape[-1] > 1 and x.stride(-1) != 1)):
            raise ValueError(f"{name} must be 2-D or 3-D with unit stride on its last dimension")
    if logits.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the triton kernels were imported without TRITON_INTERPRET=1 and cannot run on CPU "
                           "tensors: set TRITON_INTERPRET=1 before importing unlearn_ext, or use CUDA tensors")
    if labels is None and op in NEEDS_LABEL:
        raise ValueError(f"op {op!r} needs labels")


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _inputs(logits, teacher, teacher2, grad) -> tuple:
    """The four row views a kernel takes; absent inputs are stood in for by the logits
    (their kernels never read them)."""
    return (*_row_view(logits), *_row_view(teacher if teacher is not None else logits),
            *_row_view(teacher2 if teacher2 is not None else logits), *_row_view(grad if grad is not None else logits))


def _labels(labels, logits):
    return labels.contiguous() if labels is not None else logits


def _scalars(p, vocab) -> tuple:
    """The kernels' scalar parameters after alpha, gamma (row_kernels.py): softcap, label
    smoothing and its per-element share, z-loss weight, beta and 1 - beta (exact in double)."""
    return (p.softcap or 1.0, p.label_smoothing, p.label_smoothing / vocab, p.lse_square_scale, p.beta, 1.0 - p.beta)


class TritonRowKernels:
    """Row kernels in Triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

    `config(kind, op, vocab, device) -> (BLOCK, num_warps)` picks the launch shapes
    (default: the per-device table of configs.py; benchmarks/bench_triton_configs.py
    passes its own to sweep them)."""

    name = "triton"
    # Writes the gradient during the forward for sum/mean: the second walk over a row, in
    # reverse, reads from L2 what the first left there, instead of a backward from memory.
    fuses_grad = True

    def __init__(self, config=config):
        self.config = config

    def forward(self, op, logits, teacher, teacher2, labels, p):
        return self._forward(op, logits, teacher, teacher2, labels, p, None, None)

    def forward_with_grad(self, op, logits, teacher, teacher2, labels, p, grad, grad_scale):
        return self._forward(op, logits, teacher, teacher2, labels, p, grad, grad_scale)

    def _forward(self, op, logits, teacher, teacher2, labels, p, grad, grad_scale):
        _check(op, logits, teacher, teacher2, labels)
        vocab = logits.shape[-1]
        rows = logits.numel() // vocab
        values = _new_output((rows,), logits.device)
        stats = _new_output((rows, NUM_STATS), logits.device)
        if rows == 0:
            return values, stats
        block, warps = self.config("forward", op, vocab, logits.device)
        # The kernel reads grad_scale (one element on the device) only when it writes the gradient.
        scale = grad_scale.reshape(1).to(torch.float32) if grad is not None else values
        with _on_device(logits):
            row_forward_kernel[(rows,)](
                *_inputs(logits, teacher, teacher2, grad), _labels(labels, logits), values, stats,
                vocab, p.ignore_index, p.inv_temperature, p.alpha, p.gamma, *_scalars(p, vocab), scale,
                OP=OP_CODES[op], HAS_LABELS=labels is not None, NEEDS_LABEL=op in NEEDS_LABEL,
                WRITE_GRAD=grad is not None, SOFTCAP=p.softcap > 0, BLOCK=block, num_warps=warps,
                enable_fp_fusion=FP_FUSION)
        return values, stats

    def backward(self, op, logits, teacher, teacher2, labels, stats, grad_rows, p, grad):
        _check(op, logits, teacher, teacher2, labels)
        vocab = logits.shape[-1]
        rows = logits.numel() // vocab
        if rows == 0:
            return
        block, warps = self.config("backward", op, vocab, logits.device)
        per_program = blocks_per_program(rows, -(-vocab // block), logits.device)
        with _on_device(logits):
            row_backward_kernel[(rows, -(-vocab // (block * per_program)))](
                *_inputs(logits, teacher, teacher2, grad), _labels(labels, logits), stats.contiguous(),
                grad_rows.float().contiguous(), vocab, p.ignore_index, p.inv_temperature, p.alpha, p.gamma,
                *_scalars(p, vocab), per_program, OP=OP_CODES[op], HAS_LABELS=labels is not None,
                NEEDS_LABEL=op in NEEDS_LABEL, SOFTCAP=p.softcap > 0, BLOCK=block, num_warps=warps,
                enable_fp_fusion=FP_FUSION)

    def scale_grad(self, grad, g):
        """grad *= g with g read on the device; every program masks its loads and stores off
        when g == 1 (no memory traffic, no host sync)."""
        if not grad.is_contiguous():  # not a buffer of ours: no skip, still no host sync
            grad.mul_(g)
            return
        n = grad.numel()
        if n == 0:
            return
        with _on_device(grad):
            scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](grad, n, g.reshape(1).to(torch.float32), BLOCK=SCALE_BLOCK)


KERNELS = TritonRowKernels()
