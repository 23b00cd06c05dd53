"""jsd: the generalised Jensen-Shannon divergence between the student's distribution p and
the teacher's q, with Liger's and TRL's β convention (β = 0 forward KL, β = 1 reverse KL).

With m = β·q + (1 − β)·p,

    jsd_β = [β·KL(q‖m) + (1 − β)·KL(p‖m)] / (β(1 − β)).

Liger's and TRL's JSD is the bracket alone, which tends to 0 at both ends and jumps to
forward KL at β = 0 and to reverse KL at β = 1. Divided by β(1 − β) it tends to KL(q‖p)
as β → 0 and to KL(p‖q) as β → 1: continuous on [0, 1], and β = 0, 1 are exactly
forward_kl and reverse_kl (which this op calls there). Multiply by β(1 − β) for Liger's
value. The kernels evaluate log(m/p) and log(m/q) so that they keep their digits when
divided by a β (or 1 − β) of 1e-6 (csrc/common/row_math.h, log_mix). The teacher never
receives a gradient.
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_fraction, check_softcap
from ._row_loss import RowLossModule, row_loss
from .forward_kl import forward_kl
from .reverse_kl import reverse_kl


def jsd(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *, beta: float = 0.5,
        ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean", temperature: float = 1.0,
        softcap: float | None = None, backend: str | None = None, inplace_backward: bool = False) -> torch.Tensor:
    """Scaled generalised JSD per row (see the module); ``labels`` (optional) only mark ignored rows."""
    beta = check_fraction("beta", beta)
    kw = dict(ignore_index=ignore_index, reduction=reduction, temperature=temperature, softcap=softcap,
              backend=backend, inplace_backward=inplace_backward)
    if beta == 0.0:
        return forward_kl(logits, teacher_logits, labels, **kw)
    if beta == 1.0:
        return reverse_kl(logits, teacher_logits, labels, **kw)
    cap = check_softcap(softcap)
    return row_loss(
        "jsd", logits, (("teacher_logits", teacher_logits),), labels, labels_required=False,
        reference_fn=lambda x, t, y: reference.jsd(x, t, y, beta=beta, ignore_index=ignore_index,
                                                   temperature=temperature, softcap=cap or None),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        inplace_backward=inplace_backward, softcap=cap, beta=beta)


class JSDLoss(RowLossModule):
    """Module form of :func:`jsd`."""

    def __init__(self, *, beta: float = 0.5, ignore_index: int = reference.IGNORE_INDEX, reduction: str = "mean",
                 temperature: float = 1.0, softcap: float | None = None, backend: str | None = None,
                 inplace_backward: bool = False):
        super().__init__(beta=beta, ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                         softcap=softcap, backend=backend, inplace_backward=inplace_backward)

    def forward(self, logits, teacher_logits, labels=None):
        return jsd(logits, teacher_logits, labels, **self.kwargs)
