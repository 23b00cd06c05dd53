"""undial: self-distillation on adjusted logits (UnDIAL, arXiv 2402.10052).

Soft-label cross entropy lse(s) − Σ q̃ s to q̃ = softmax(t − γ·onehot(label)), the frozen
teacher with the label's logit lowered by γ. The kernel subtracts γ when it loads the
label's teacher logit (never by correcting a finished sum, which loses precision exactly
when q_y ≈ 1). Ignored rows contribute nothing: unlike the public implementation, the
vocabulary is never indexed with −100. γ applies to the raw teacher logits, then τ.
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_finite, check_softcap
from ._row_loss import RowLossModule, row_loss


def undial(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, gamma: float = 10.0,
           ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean", temperature: float = 1.0,
           softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False) -> torch.Tensor:
    """Soft-label CE to the γ-adjusted teacher; γ ∈ {3, 10, 30} in the paper, 10 by default."""
    gamma = check_finite("gamma", gamma)
    cap = check_softcap(softcap)
    return row_loss(
        "undial", logits, (("teacher_logits", teacher_logits),), labels, labels_required=True,
        reference_fn=lambda x, t, y: reference.undial(x, t, y, gamma=gamma, ignore_index=ignore_index,
                                                      temperature=temperature, softcap=cap or None),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward, gamma=gamma, softcap=cap)


class UnDIALLoss(RowLossModule):
    """Module form of :func:`undial`."""

    def __init__(self, *, gamma: float = 10.0, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean",
                 temperature: float = 1.0, softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False):
        super().__init__(gamma=gamma, ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         softcap=softcap, backend=backend, inplace_backward=inplace_backward)

    def forward(self, logits, teacher_logits, labels):
        return undial(logits, teacher_logits, labels, **self.kwargs)
