"""Negative Preference Optimization (arXiv 2404.05868), and its +RT / +KL variants.

loss = (2/β)·softplus(β(ℓ_b − ℓ_b^ref)) averaged over forget sequences, ℓ_b the summed
log-probability of answer b under the model and ℓ_b^ref under the frozen starting model;
β = 0.1. NPO+RT adds w_r·NLL_retain, NPO+KL adds w_r·KL(π_ref ‖ π_θ) on retain answers
(w_r = 1, the published setting).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, option


@dataclass
class NPOOptions:
    beta: float = option(0.1, "inverse temperature β of the NPO loss")
    retain_weight: float = option(1.0, "w_r, weight of the retain term (npo_rt / npo_kl)")


class NPO(Method):
    name = "npo"
    Options = NPOOptions
    retain_kind: str | None = None  # None: plain NPO; "nll": NPO+RT; "kl": NPO+KL

    def needs_reference(self):
        return True

    def needs_retain(self):
        return self.retain_kind is not None and self.options.retain_weight != 0

    def loss(self, batch):
        forget = batch["forget"]
        ref_logprob = self.frozen_logprob(self.models.reference, forget)
        value = self.head.npo_loss(self.student(forget), ref_logprob, beta=self.options.beta)
        weight = self.options.retain_weight if self.retain_kind else 0.0
        return self.add_retain(batch, value, {"npo": value.detach()}, self.retain_kind or "nll", weight)


class NPORT(NPO):
    name = "npo_rt"
    retain_kind = "nll"


class NPOKL(NPO):
    name = "npo_kl"
    retain_kind = "kl"
