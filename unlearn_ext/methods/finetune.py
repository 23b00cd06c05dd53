"""Plain fine-tuning: NLL on answer tokens. The ``finetune`` command (teach a model the
data it will later forget) and RKLD's augmented model use it."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass
class FinetuneOptions:
    pass


class Finetune(Method):
    name = "finetune"
    Options = FinetuneOptions
    primary = "train"

    def loss(self, batch):
        value = self.head.cross_entropy(self.student(batch["train"]))
        return value, {"nll": value.detach()}
