"""cross_entropy: lse(logits / τ) − logits[label] / τ per row, a drop-in for
torch.nn.functional.cross_entropy over vocabulary-sized logits (no [N, V] temporaries).

The options Liger-Kernel users expect, on every backend:
  label_smoothing ε    PyTorch's: (1 − ε)·CE + ε·mean over V of −log p;
  lse_square_scale z   Liger's z-loss: + z·lse² per row; ``return_z_loss=True`` returns
                       (loss, z_loss) like LigerCrossEntropyLoss (z_loss for logging: it has
                       no gradient of its own, the loss carries the z-loss's);
  softcap c            Gemma-2's c·tanh(logits / c), applied on load (then τ).
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_finite, check_fraction, check_softcap
from ._row_loss import RowLossModule, row_loss


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = reference.IGNORE_INDEX,
                  reduction: str = "mean", temperature: float = 1.0, label_smoothing: float = 0.0,
                  lse_square_scale: float = 0.0, return_z_loss: bool = False, softcap: float | None = None,
                  backend: str | None = None, inplace_backward: bool = False):
    """Cross entropy of each row against its label.

    Arguments as :func:`unlearn_ext.token_logprob`; ``mean`` divides by the number of
    counted rows (0 when no row counts, not NaN, so a batch without answer tokens is harmless).
    Ignored rows count in neither the loss nor the smoothing (PyTorch's behaviour).
    """
    eps = check_fraction("label_smoothing", label_smoothing)
    z = check_finite("lse_square_scale", lse_square_scale, nonnegative=True)
    cap = check_softcap(softcap)
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {type(return_z_loss).__name__}")
    options = dict(ignore_index=ignore_index, temperature=temperature, softcap=cap or None)
    return row_loss(
        "cross_entropy", logits, (), labels, labels_required=True,
        reference_fn=lambda x, y: reference.cross_entropy(x, y, label_smoothing=eps, lse_square_scale=z, **options),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward, softcap=cap, label_smoothing=eps, lse_square_scale=z,
        z_loss_fn=(lambda x, y: reference.z_loss(x, y, lse_square_scale=z, **options)) if return_z_loss else None)


class CrossEntropyLoss(RowLossModule):
    """Module form of :func:`cross_entropy`."""

    def __init__(self, *, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean",
                 temperature: float = 1.0, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 return_z_loss: bool = False, softcap: float | None = None, backend: str | None = None,
                 inplace_backward: bool = False):
        super().__init__(ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                         return_z_loss=return_z_loss, softcap=softcap, backend=backend,
                         inplace_backward=inplace_backward)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        return cross_entropy(logits, labels, **self.kwargs)
