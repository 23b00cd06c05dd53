"""cross_entropy: lse(logits / τ) − logits[label] / τ per row, a drop-in for
torch.nn.functional.cross_entropy over vocabulary-sized logits (no [N, V] temporaries)."""
from __future__ import annotations

import torch

from .. import reference
from ._row_loss import RowLossModule, row_loss


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = reference.IGNORE_INDEX,
                  reduction: str = "mean", temperature: float = 1.0, backend: str | None = None,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Cross entropy of each row against its label.

    Arguments as :func:`unlearn_ext.token_logprob`; ``mean`` divides by the number of
    counted rows (0 when no row counts, not NaN, so a batch without answer tokens is harmless).
    """
    return row_loss(
        "cross_entropy", logits, (), labels, labels_required=True,
        reference_fn=lambda x, y: reference.cross_entropy(x, y, ignore_index=ignore_index, temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward)


class CrossEntropyLoss(RowLossModule):
    """Module form of :func:`cross_entropy`."""

    def __init__(self, *, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean",
                 temperature: float = 1.0, backend: str | None = None, inplace_backward: bool = False):
        super().__init__(ignore_index=ignore_index, reduction=reduction, temperature=temperature, backend=backend,
                         inplace_backward=inplace_backward)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels, **self.kwargs)
