"""Gradient ascent: maximise the NLL of the forget answers (the baseline of TOFU, arXiv 2401.06121).

loss = −NLL_forget (mean over answer tokens). Unbounded below: it eventually destroys the
model, which is why the other methods exist.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass
class GAOptions:
    pass


class GA(Method):
    name = "ga"
    Options = GAOptions

    def loss(self, batch):
        value = self.head.ga_loss(self.student(batch["forget"]))
        return value, {"forget_nll": -value.detach()}
