"""Argument checks shared by every public op: bad input gets a ValueError or TypeError that
names the argument, before any kernel runs."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def tracing() -> bool:
    """True under torch.compile or CUDA-graph capture: no data-dependent checks then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def host_reads_are_free(t: torch.Tensor) -> bool:
    """True when reading a value of t on the host costs no synchronisation and breaks no
    trace: an eager CPU tensor. Elsewhere (GPUs, torch.compile, CUDA-graph capture, meta
    tensors) the code must take its data-independent path."""
    return t.device.type == "cpu" and not tracing()


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {logits.layout}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape [N, V] or [B, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")


def check_teacher(teacher, logits: torch.Tensor, name: str) -> None:
    check_logits(teacher, name)
    if teacher.shape != logits.shape:
        raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}, got {tuple(teacher.shape)}")
    if teacher.device != logits.device:
        raise ValueError(f"{name} is on {teacher.device} but logits are on {logits.device}")


def check_labels(labels, logits: torch.Tensor, ignore_index: int, required: bool) -> torch.Tensor | None:
    """Labels as a flat int64 tensor with one entry per row, or None."""
    if labels is None:
        if required:
            raise ValueError("labels are required for this loss")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits without V), "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    flat = labels.reshape(-1).to(torch.int64)
    if flat.numel() > 0:
        vocab = logits.shape[-1]
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
        if flat.device.type != "cpu":
            # No host synchronisation on GPUs: a device-side assert (also under CUDA-graph
            # capture and torch.compile; a no-op on meta tensors); the kernels also write
            # NaN for such a row.
            torch._assert_async(~bad.any(), f"unlearn_ext: labels hold a value outside [0, {vocab}) "
                                            f"that is not ignore_index ({ignore_index})")
        elif not tracing() and bool(bad.any()):  # free on the CPU; compiled, the C++ kernels check
            first = int(flat[bad][0])
            raise ValueError(f"labels hold {first}, outside [0, {vocab}) and not ignore_index ({ignore_index})")
    return flat


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_finite(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def check_softcap(softcap) -> float:
    """Gemma-2's logit cap c > 0 as a float, or 0.0 for None (no cap)."""
    if softcap is None:
        return 0.0
    return check_finite("softcap", softcap, positive=True)


def check_fraction(name: str, value, *, open_ends: bool = False) -> float:
    """A number in [0, 1] (or (0, 1) with open_ends)."""
    value = check_finite(name, value)
    if not (0 < value < 1 if open_ends else 0 <= value <= 1):
        raise ValueError(f"{name} must be in {'(0, 1)' if open_ends else '[0, 1]'}, got {value}")
    return value
