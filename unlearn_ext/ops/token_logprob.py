"""token_logprob: the log-probability of each row's label, log softmax(logits / τ)[label].

The building block of the sequence losses (NPO, SimNPO): its per-row gradient
onehot(y) − p is exact for any upstream gradient, and 1 − p_y is computed as
−expm1(value), so memorised tokens (p_y ≈ 1) keep their gradient.
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_softcap
from ._row_loss import RowLossModule, row_loss


def token_logprob(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = reference.IGNORE_INDEX,
                  reduction: str = "none", temperature: float = 1.0, softcap: float | None = None, backend: str | None = None,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Per-row log-probability of the label (0 on ignored rows).

    Args:
        logits: [N, V] or [B, T, V], float32 / bfloat16 / float16 (float64: computed in float64).
        labels: [N] or [B, T] integer token ids; ``ignore_index`` marks rows that count nothing.
        reduction: ``none`` (float32 per row, the default here), ``sum`` or ``mean`` (over counted rows).
        temperature: divides the logits before the softmax.
        backend: ``torch``, ``cpu``, ``cuda`` or ``triton``; default: the fastest for the device.
        inplace_backward: write the gradient over ``logits`` (do not use them afterwards).
    """
    cap = check_softcap(softcap)
    return row_loss(
        "token_logprob", logits, (), labels, labels_required=True,
        reference_fn=lambda x, y: reference.token_logprob(x, y, ignore_index=ignore_index, temperature=temperature, softcap=cap or None),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward, softcap=cap)


class TokenLogProb(RowLossModule):
    """Module form of :func:`token_logprob`."""

    def __init__(self, *, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "none",
                 temperature: float = 1.0, softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False):
        super().__init__(ignore_index=ignore_index, reduction=reduction, temperature=temperature, softcap=softcap, backend=backend,
                         inplace_backward=inplace_backward)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_logprob(logits, labels, **self.kwargs)
