"""Negative Preference Optimization (arXiv 2404.05868), and its +RT / +KL variants.

loss = w_f·(2/β)·softplus(β(ℓ_b − ℓ_b^ref)) averaged over forget sequences, ℓ_b the summed
log-probability of answer b under the model and ℓ_b^ref under the frozen starting model;
β = 0.1. NPO+RT adds w_r·NLL_retain, NPO+KL adds w_r·KL(π_ref ‖ π_θ) on retain answers.
w_f = w_r = 1: the NPO authors' code (licong-lin/negative-preference-optimization,
``npo_coeff: 1.0``, ``grad_diff_coeff: 1.0``, ``KL_coeff: 1.0``) and open-unlearning's ``NPO``
(``gamma: 1.0``, ``alpha: 1.0``; its ``NPO`` is our ``npo_rt``).

open-unlearning's names: ``gamma`` = ``forget_weight``, ``alpha`` = ``retain_weight``,
``beta`` = ``beta``. Its (and the NPO authors') KL averages over every position of the
retain batch; ``masking: open_unlearning`` does the same for ``npo_kl`` (default: answer tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, masking_option, option


@dataclass
class NPOOptions:
    beta: float = option(0.1, "inverse temperature β of the NPO loss")
    forget_weight: float = option(1.0, "w_f, weight of the NPO term")
    retain_weight: float = option(1.0, "w_r, weight of the retain term (npo_rt / npo_kl)")
    masking: str = masking_option()


class NPO(Method):
    name = "npo"
    Options = NPOOptions
    retain_kind: str | None = None  # None: plain NPO; "nll": NPO+RT; "kl": NPO+KL
    open_unlearning_names = {"gamma": "forget_weight", "alpha": "retain_weight"}

    def needs_reference(self):
        return True

    def needs_retain(self):
        return self.retain_kind is not None and self.options.retain_weight != 0

    def loss(self, batch):
        o, forget = self.options, batch["forget"]
        ref_logprob, _ = self.head.sequence_logprob(self.frozen(self.models.reference, forget))
        value = self.head.npo_loss(self.student(forget), ref_logprob, beta=o.beta)
        weight = o.retain_weight if self.retain_kind else 0.0
        return self.add_retain(batch, o.forget_weight * value, {"npo": value.detach()}, self.retain_kind or "nll",
                               weight, o.masking)


class NPORT(NPO):
    name = "npo_rt"
    retain_kind = "nll"


class NPOKL(NPO):
    name = "npo_kl"
    retain_kind = "kl"
