"""SimNPO (arXiv 2410.07163): NPO without a reference model, length-normalised.

loss = γ·(2/β)·softplus(−β(NLL_b/|y_b| − δ)) averaged over forget sequences + α·NLL_retain.

The weight γ is on the *forget* term and the retain NLL has weight α = 1, as in the
authors' code (OPTML-Group/Unlearn-Simple, TOFU/config/forget.yaml and README: forget05
``npo_coeff 0.1375``, ``beta 2.5``; forget10 ``npo_coeff 0.125``, ``beta 4.5``;
``grad_diff_coeff 1.0``, ``gamma 0.0``) and in open-unlearning's ``SimNPO`` (``gamma 0.125``,
``alpha 1``, ``beta 4.5``, ``delta 0``). Defaults: the forget05 setting.

Names: ours ``forget_weight`` = the authors' ``npo_coeff`` = open-unlearning's ``gamma``;
``retain_weight`` = ``grad_diff_coeff`` = ``alpha``; ``delta`` = the authors' ``gamma`` =
open-unlearning's ``delta``; ``beta`` = ``beta``. (Before this, ``retain_weight`` defaulted
to 0.1375 with the forget term unweighted: a retain/forget ratio 53× too small.)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from .base import Method, option

AUTHORS_FORGET_WEIGHTS = (0.1375, 0.125)


@dataclass
class SimNPOOptions:
    beta: float = option(2.5, "inverse temperature β (2.5 for forget05, 4.5 for forget10)")
    delta: float = option(0.0, "reward margin δ on the length-normalised NLL (the authors' gamma)")
    forget_weight: float = option(0.1375, "γ, weight of the SimNPO forget term (the authors' npo_coeff: 0.1375 "
                                          "forget05, 0.125 forget10)")
    retain_weight: float = option(1.0, "α, weight of the retain NLL (the authors' grad_diff_coeff)")


class SimNPO(Method):
    name = "simnpo"
    Options = SimNPOOptions
    open_unlearning_names = {"gamma": "forget_weight", "alpha": "retain_weight"}

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        if self.options.retain_weight in AUTHORS_FORGET_WEIGHTS:  # what configs written before said
            warnings.warn(f"simnpo: retain_weight {self.options.retain_weight} is the SimNPO authors' *forget* "
                          f"weight (npo_coeff); it belongs in forget_weight (the retain NLL has weight 1 in "
                          f"their code)", UserWarning, stacklevel=2)

    def loss(self, batch):
        o = self.options
        value = self.head.simnpo_loss(self.student(batch["forget"]), beta=o.beta, delta=o.delta)
        return self.add_retain(batch, o.forget_weight * value, {"simnpo": value.detach()}, "nll", o.retain_weight)
