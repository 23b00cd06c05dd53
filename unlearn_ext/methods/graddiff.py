"""Gradient difference: ascend on the forget answers, descend on the retain answers
(TOFU, arXiv 2401.06121; "GA+RT" in the RKLD paper).

loss = −w_f·NLL_forget + w_r·NLL_retain, or + w_r·KL(π_ref ‖ π_θ) on retain with
``retain_loss: kl`` (the frozen starting model as π_ref). Weights w_f = w_r = 1, as in
TOFU's code and open-unlearning's ``GradDiff`` (``gamma: 1.0``, ``alpha: 1.0``).

open-unlearning's names: ``gamma`` = ``forget_weight``, ``alpha`` = ``retain_weight``,
``retain_loss_type`` NLL/KL = ``retain_loss`` nll/kl. Its KL averages over every position
of the retain batch; ``masking: open_unlearning`` does the same (default: answer tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, masking_option, option


@dataclass
class GradDiffOptions:
    forget_weight: float = option(1.0, "w_f, weight of the forget NLL ascended")
    retain_weight: float = option(1.0, "w_r, weight of the retain term")
    retain_loss: str = option("nll", "retain term: nll, or kl = KL(reference || model) on retain answers",
                              ("nll", "kl"))
    masking: str = masking_option()


class GradDiff(Method):
    name = "graddiff"
    Options = GradDiffOptions
    open_unlearning_names = {"gamma": "forget_weight", "alpha": "retain_weight", "retain_loss_type": "retain_loss"}

    def needs_reference(self):
        return self.options.retain_loss == "kl"

    def loss(self, batch):
        o = self.options
        forget_nll = -self.head.ga_loss(self.student(batch["forget"]))
        return self.add_retain(batch, -o.forget_weight * forget_nll, {"forget_nll": forget_nll.detach()},
                               o.retain_loss, o.retain_weight, o.masking)
