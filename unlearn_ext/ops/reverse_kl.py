"""reverse_kl: KL(p ‖ q) per row, the mode-seeking divergence that RKLD distils with.

Gradient p ⊙ (log p − log q − KL), computed as p ⊙ ((s − t) − E_p[s − t]) from the
per-row statistics the forward saves.
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_softcap
from ._row_loss import RowLossModule, row_loss


def reverse_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
               ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean", temperature: float = 1.0,
               softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False) -> torch.Tensor:
    """KL(student ‖ teacher) per row; ``labels`` (optional) only mark ignored rows."""
    cap = check_softcap(softcap)
    return row_loss(
        "reverse_kl", logits, (("teacher_logits", teacher_logits),), labels, labels_required=False,
        reference_fn=lambda x, t, y: reference.reverse_kl(x, t, y, ignore_index=ignore_index, temperature=temperature, softcap=cap or None),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward, softcap=cap)


class ReverseKLLoss(RowLossModule):
    """Module form of :func:`reverse_kl`."""

    def __init__(self, *, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean",
                 temperature: float = 1.0, softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False):
        super().__init__(ignore_index=ignore_index, reduction=reduction, temperature=temperature, softcap=softcap, backend=backend,
                         inplace_backward=inplace_backward)

    def forward(self, logits, teacher_logits, labels=None):
        return reverse_kl(logits, teacher_logits, labels, **self.kwargs)
