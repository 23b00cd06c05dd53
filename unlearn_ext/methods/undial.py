"""UnDIAL (arXiv 2402.10052): self-distillation on adjusted logits.

The frozen starting model is the teacher; on forget answer tokens its logits are lowered
by γ at the true token, t − γ·onehot(y), and the student is trained with soft-label cross
entropy to softmax of that. Only answer tokens count (ignored positions contribute
nothing: unlike the public implementation, the vocabulary is never indexed with −100).
γ = 10 (the paper sweeps 3, 10, 30). The paper trains on the forget set only; an optional
retain NLL (w_r, default 0 as in public configs) is available.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, option


@dataclass
class UnDIALOptions:
    gamma: float = option(10.0, "γ, how much the true token's teacher logit is lowered (3, 10 or 30)")
    retain_weight: float = option(0.0, "w_r, weight of an optional retain NLL (0 = the paper's setting)")


class UnDIAL(Method):
    name = "undial"
    Options = UnDIALOptions

    def needs_reference(self):
        return True

    def needs_retain(self):
        return self.options.retain_weight != 0

    def loss(self, batch):
        forget = batch["forget"]
        teacher = self.frozen(self.models.reference, forget)
        value = self.head.undial(self.student(forget), teacher, gamma=self.options.gamma)
        return self.add_retain(batch, value, {"undial": value.detach()}, "nll", self.options.retain_weight)
