"""Gradient difference: ascend on the forget answers, descend on the retain answers
(TOFU, arXiv 2401.06121; "GA+RT" in the RKLD paper).

loss = −w_f·NLL_forget + w_r·NLL_retain, or + w_r·KL(π_ref ‖ π_θ) on retain with
``retain_loss: kl`` (the frozen starting model as π_ref). Weights 1/1 as in public code.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, option


@dataclass
class GradDiffOptions:
    forget_weight: float = option(1.0, "w_f, weight of the forget NLL ascended")
    retain_weight: float = option(1.0, "w_r, weight of the retain term")
    retain_loss: str = option("nll", "retain term: nll, or kl = KL(reference || model) on retain answers")


class GradDiff(Method):
    name = "graddiff"
    Options = GradDiffOptions

    def needs_reference(self):
        return self.options.retain_loss == "kl"

    def needs_retain(self):
        return self.options.retain_weight != 0

    def loss(self, batch):
        o = self.options
        forget_nll = -self.head.ga_loss(self.student(batch["forget"]))
        return self.add_retain(batch, -o.forget_weight * forget_nll, {"forget_nll": forget_nll.detach()},
                               o.retain_loss, o.retain_weight)
