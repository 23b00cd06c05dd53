"""rkld: reverse KL to the RKLD teacher (arXiv 2406.01983).

The teacher o − α·relu(a − o) is built inside the kernel from the original model's logits
o and the augmented model's logits a (the original fine-tuned further on the forget set):
tokens the augmented model learned to prefer are pushed down. The teacher's [N, V] logits
are never written to memory. α and then τ apply: teacher = (o − α·relu(a − o)) / τ.
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_finite, check_softcap
from ._row_loss import RowLossModule, row_loss


def rkld(logits: torch.Tensor, original_logits: torch.Tensor, augmented_logits: torch.Tensor,
         labels: torch.Tensor | None = None, *, alpha: float = 8.0, ignore_index: int = reference.IGNORE_INDEX,
         reduction: str = "mean", temperature: float = 1.0, softcap: float | None = None, backend: str | None = None,
         inplace_backward: bool = False) -> torch.Tensor:
    """KL(student ‖ teacher) per row with the RKLD teacher; α = 8 is the paper's TOFU value."""
    alpha = check_finite("alpha", alpha, nonnegative=True)
    cap = check_softcap(softcap)
    return row_loss(
        "rkld", logits, (("original_logits", original_logits), ("augmented_logits", augmented_logits)), labels,
        labels_required=False,
        reference_fn=lambda x, o, a, y: reference.rkld(x, o, a, y, alpha=alpha, ignore_index=ignore_index,
                                                       temperature=temperature, softcap=cap or None),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward, alpha=alpha, softcap=cap)


class RKLDLoss(RowLossModule):
    """Module form of :func:`rkld`."""

    def __init__(self, *, alpha: float = 8.0, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean",
                 temperature: float = 1.0, softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False):
        super().__init__(alpha=alpha, ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         softcap=softcap, backend=backend, inplace_backward=inplace_backward)

    def forward(self, logits, original_logits, augmented_logits, labels=None):
        return rkld(logits, original_logits, augmented_logits, labels, **self.kwargs)
