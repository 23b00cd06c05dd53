"""The inputs of a fused-linear loss: LM heads (hidden states, weight, bias, softcap), their
checks, and the rows a loss reads.

A loss reads only the rows that count (labels other than ``ignore_index``): prompt and
padding tokens cost no matmul, and a caller can pass unshifted ``hidden`` [B, T, H] with
labels shifted by :func:`shift_labels` (the last position ignored) so that nothing the size
of the hidden states is ever copied.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..ops._checks import FLOAT_DTYPES, check_labels
from ..ops._row_loss import new_grad_buffer


class LMHeadInputs(NamedTuple):
    """What an LM head turns into logits: ``softcap(hidden @ weight.T + bias)``.

    ``hidden`` [..., H] (any leading shape, e.g. [B, T, H] or a slice such as
    ``hidden[:, :-1]``), ``weight`` [V, H], ``bias`` [V] or None, ``softcap`` c > 0 for
    Gemma-2-style logits ``c·tanh(z / c)`` or None. Teachers are passed as one of these
    (or a plain ``(hidden, weight)`` tuple); :func:`unlearn_ext.models.lm_head_inputs`
    returns one for a Hugging Face causal LM.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def logits(self) -> torch.Tensor:
        """The materialised logits [..., V] (for checks on small inputs; the losses never form them)."""
        z = torch.nn.functional.linear(self.hidden, self.weight, self.bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels [B, T] of the batch contract (unshifted) → the label each position predicts:
    ``labels[:, 1:]`` with ``ignore_index`` appended. With these, unshifted hidden states
    [B, T, H] go to a fused-linear loss as they are (no copy of ``hidden[:, :-1]``, and the
    last position costs nothing: ignored rows are skipped)."""
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_head(head, name: str, *, like: LMHeadInputs | None = None, mixed_dtypes: bool = False) -> LMHeadInputs:
    """Validates an LM head. ``name`` prefixes the argument names in errors (``""`` for the
    student: hidden, weight, …; ``"teacher"``: teacher.hidden, …). ``like``: the student,
    whose rows, vocabulary and device a teacher must share. ``mixed_dtypes``: under
    autocast, weight and bias may differ from hidden (autocast_heads casts them)."""
    if not isinstance(head, tuple) or not 2 <= len(head) <= 4:
        raise TypeError(f"{name} must be an LMHeadInputs or a (hidden, weight[, bias[, softcap]]) tuple, "
                        f"got {type(head).__name__}")
    head = LMHeadInputs(*head)
    arg = (lambda field: f"{name}.{field}") if name else (lambda field: field)
    hidden, weight, bias, softcap = head
    _check_tensor(hidden, arg("hidden"))
    _check_tensor(weight, arg("weight"))
    if hidden.dim() < 2:
        raise ValueError(f"{arg('hidden')} must have shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{arg('weight')} must have shape [V, H] with H = {hidden.shape[-1]} (the last dimension "
                         f"of {arg('hidden')}), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{arg('weight')} has an empty vocabulary dimension (V = 0)")
    if weight.dtype != hidden.dtype and not mixed_dtypes:
        raise TypeError(f"{arg('weight')} must have the dtype of {arg('hidden')} ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{arg('weight')} is on {weight.device} but {arg('hidden')} is on {hidden.device}")
    if bias is not None:
        _check_tensor(bias, arg("bias"))
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{arg('bias')} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if (bias.dtype != hidden.dtype and not mixed_dtypes) or bias.device != hidden.device:
            raise TypeError(f"{arg('bias')} must have the dtype and device of {arg('hidden')} "
                            f"({hidden.dtype}, {hidden.device}), got {bias.dtype}, {bias.device}")
    if softcap is not None:
        try:
            softcap = float(softcap)
        except (TypeError, ValueError):
            raise TypeError(f"{arg('softcap')} must be a number or None, got {type(softcap).__name__}") from None
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"{arg('softcap')} must be positive and finite, got {softcap}")
    if like is not None:
        if hidden.shape[:-1] != like.hidden.shape[:-1]:
            raise ValueError(f"{arg('hidden')} must have the rows of hidden {tuple(like.hidden.shape[:-1])} "
                             f"(any H), got {tuple(hidden.shape)}")
        if weight.shape[0] != like.weight.shape[0]:
            raise ValueError(f"{arg('weight')} must have the vocabulary of weight (V = {like.weight.shape[0]}), "
                             f"got {tuple(weight.shape)}")
        if hidden.device != like.hidden.device:
            raise ValueError(f"{arg('hidden')} is on {hidden.device} but hidden is on {like.hidden.device}")
    return LMHeadInputs(hidden, weight, bias, softcap)


def check_fused_labels(labels, student: LMHeadInputs, ignore_index: int, required: bool) -> torch.Tensor | None:
    """Labels as a flat int64 tensor with one entry per row of hidden, or None."""
    if isinstance(labels, torch.Tensor) and labels.shape != student.hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(student.hidden.shape[:-1])} (hidden without H), "
                         f"got {tuple(labels.shape)}")
    # check_labels wants logits: a zero-stride stand-in of shape [..., V] holds one element.
    logits_shape = student.hidden.new_empty(()).expand(*student.hidden.shape[:-1], student.weight.shape[0])
    return check_labels(labels, logits_shape, ignore_index, required)


def autocast_heads(heads: list[LMHeadInputs]) -> list[LMHeadInputs]:
    """Under autocast, the dtype F.linear would compute in: autocast's (the casts are
    differentiable, so a float32 master weight receives its gradient in float32). A weight
    shared by several heads (tied student and teacher) is cast once."""
    device_type = heads[0].hidden.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return heads
    dtype = torch.get_autocast_dtype(device_type)
    cast: dict[int, torch.Tensor] = {}

    def to(x):
        if x is None or x.dtype == dtype or x.dtype == torch.float64:  # autocast leaves float64 alone
            return x
        if id(x) not in cast:
            cast[id(x)] = x.to(dtype)
        return cast[id(x)]

    return [LMHeadInputs(to(h.hidden), to(h.weight), to(h.bias), h.softcap) for h in heads]


class Rows:
    """The rows of hidden states [..., H] a loss reads, in reading order, and the chunks it
    reads them in.

    ``index`` None: every row in order (chunks of a 2-D view are slices, no copy);
    else the flat row numbers (e.g. the rows whose label counts), gathered chunk by chunk.
    """

    def __init__(self, lead_shape: torch.Size, index: torch.Tensor | None, bounds: list[tuple[int, int]]):
        self.lead_shape = lead_shape
        self.total = math.prod(lead_shape)
        self.index = index
        self.count = self.total if index is None else index.numel()
        self.bounds = bounds

    @staticmethod
    def even_bounds(count: int, chunk: int) -> list[tuple[int, int]]:
        return [(s, min(s + chunk, count)) for s in range(0, count, chunk)]

    def take(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (in reading order) of x [..., H] as a [C, H] tensor."""
        flat = _flat_view(x)
        if self.index is None:
            if flat is not None:
                return flat[start:stop]
            idx = torch.arange(start, stop, device=x.device)
        else:
            idx = self.index[start:stop]
        if flat is not None:
            return flat.index_select(0, idx)
        return x[torch.unravel_index(idx, x.shape[:-1])]

    def new_row_buffer(self, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [rows of hidden, cols] buffer for per-row results: zeros where the loss skips
        rows, else uninitialised (NaN under UNLEARN_EXT_POISON=1: every row must be written)."""
        if self.index is not None:
            return torch.zeros((self.total, cols), dtype=dtype, device=device)
        return new_grad_buffer(torch.empty((), dtype=dtype, device=device).expand(self.total, cols))

    def put(self, out: torch.Tensor, start: int, stop: int, values: torch.Tensor) -> None:
        """Writes the values of rows start:stop into a buffer from new_row_buffer."""
        if self.index is None:
            out[start:stop].copy_(values)
        else:
            out.index_copy_(0, self.index[start:stop], values)

    def gather(self, per_row: torch.Tensor) -> torch.Tensor:
        """Entries of a per-row tensor (shape lead_shape) in reading order."""
        flat = per_row.reshape(-1)
        return flat if self.index is None else flat.index_select(0, self.index)


def _flat_view(x: torch.Tensor) -> torch.Tensor | None:
    """x [..., H] as a [N, H] view, or None when its strides do not allow one (e.g. hidden[:, :-1])."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None
