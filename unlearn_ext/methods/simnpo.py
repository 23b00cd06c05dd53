"""SimNPO (arXiv 2410.07163): NPO without a reference model, length-normalised.

loss = (2/β)·softplus(−β(NLL_b/|y_b| − δ)) averaged over forget sequences, plus
λ·NLL_retain. Defaults are the paper's TOFU forget05 setting: β = 2.5, δ = 0, λ = 0.1375
(forget10: β = 4.5, λ = 0.125).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, option


@dataclass
class SimNPOOptions:
    beta: float = option(2.5, "inverse temperature β (2.5 for forget05, 4.5 for forget10)")
    delta: float = option(0.0, "reward margin δ on the length-normalised NLL")
    retain_weight: float = option(0.1375, "λ, weight of the retain NLL (0.1375 forget05, 0.125 forget10)")


class SimNPO(Method):
    name = "simnpo"
    Options = SimNPOOptions

    def needs_retain(self):
        return self.options.retain_weight != 0

    def loss(self, batch):
        o = self.options
        value = self.head.simnpo_loss(self.student(batch["forget"]), beta=o.beta, delta=o.delta)
        return self.add_retain(batch, value, {"simnpo": value.detach()}, "nll", o.retain_weight)
