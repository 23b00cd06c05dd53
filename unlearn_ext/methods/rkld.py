"""RKLD — reverse-KL knowledge distillation for unlearning (arXiv 2406.01983; RKLU at NAACL 2025).

``prepare`` builds the *augmented* model: a copy of the original fine-tuned further on the
forget set with plain NLL (the paper: 10 epochs at lr 1e-5), so that it exaggerates
exactly what the forget set taught. The unlearning teacher on forget answer tokens is
``o − α·relu(a − o)`` (o original, a augmented logits; α = 8 on TOFU): tokens the
augmented model boosted are pushed down, the rest of the distribution is left as it was.
The student minimises KL(student ‖ teacher) — reverse KL, the paper's point (its
forward-KL ablation fails). The teacher is built inside the kernel, never in memory.

loss = w_f·RKLD_forget + w_r·retain. The paper's objective has no retain term (the teacher
keeps everything but the boosted tokens): w_f = 1, w_r = 0 (no public code; not in
open-unlearning). An optional retain NLL or KL is available; ``masking: open_unlearning``
averages that KL over every position, as open-unlearning's KL retain term does.

Under LoRA (the reference is the student with its adapters disabled) the augmented model
is a second adapter on the same base, not a copy: ``prepare`` adds it, fine-tunes only it
(the same run as on a copy with LoRA: same initialisation, same steps) and freezes it; the
teacher runs the base with that adapter active, and ``finish`` removes it. One base in
memory. Under FSDP (several processes) it stays a copy: the nested run would shard the
student a second time. Set ``augment_lr`` to a LoRA learning rate then (the paper's 1e-5
is for full fine-tuning).
Note: ``alpha`` here is the paper's α of the teacher, not a retain weight (open-unlearning's
``alpha``): that is ``retain_weight``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from .. import lora
from .base import Method, Models, freeze, masking_option, option
from .finetune import Finetune

AUGMENTED_ADAPTER = "rkld_augmented"


@dataclass
class RKLDOptions:
    alpha: float = option(8.0, "α in the teacher o − α·relu(a − o)")
    augment_epochs: float = option(10.0, "epochs of NLL on the forget set that make the augmented model")
    augment_lr: float = option(1e-5, "learning rate of the augmented model's fine-tuning")
    forget_weight: float = option(1.0, "w_f, weight of the reverse-KL forget term")
    retain_weight: float = option(0.0, "w_r, weight of an optional retain term (0 = the paper's objective)")
    retain_loss: str = option("nll", "retain term: nll, or kl = KL(reference || model) on retain answers",
                              ("nll", "kl"))
    masking: str = masking_option()


class RKLD(Method):
    name = "rkld"
    Options = RKLDOptions

    def needs_reference(self):
        return True

    def prepare(self, models, data):
        from ..trainer import TrainConfig, TrainData, derive_seed, train  # the trainer imports the methods
        super().prepare(models, data)
        o = self.options
        outer = data.train_config if data.train_config is not None else TrainConfig()
        config = dataclasses.replace(outer, lr=o.augment_lr, epochs=o.augment_epochs, max_steps=None,
                                     output_dir=None, resume=False, desc="rkld: augmented model",
                                     eval_every=0, keep_best=False)  # the outer run's evaluator is not this run's
        finetune, examples = Finetune(head=self.head), TrainData(data.forget, collate=data.collate)
        if _augment_as_adapter(models, outer):
            student = models.student
            if AUGMENTED_ADAPTER in student.peft_config:  # prepared before (a resume in the same process)
                lora.delete_adapter(student, AUGMENTED_ADAPTER)
            torch.manual_seed(derive_seed(config.seed, "lora"))  # as the copy's adapters would be drawn
            lora.add_adapter(student, AUGMENTED_ADAPTER)
            with lora.training_only(student, AUGMENTED_ADAPTER):
                train(finetune, Models(student=lora.TrainAdapter(student, AUGMENTED_ADAPTER)), examples,
                      dataclasses.replace(config, lora_r=0, train_layers=None))
            models.extra["augmented"] = lora.WithoutAdapters(student, AUGMENTED_ADAPTER)
            return
        augmented = copy.deepcopy(models.reference).requires_grad_(True)
        augmented = train(finetune, Models(student=augmented), examples, config)
        models.extra["augmented"] = freeze(augmented)

    def finish(self, output_dir, is_main=True):
        augmented = self.models.extra.get("augmented")
        if isinstance(augmented, lora.WithoutAdapters) and augmented._adapter == AUGMENTED_ADAPTER:
            lora.delete_adapter(self.models.student, AUGMENTED_ADAPTER)  # a training aid: not saved with the student's
            del self.models.extra["augmented"]

    def loss(self, batch):
        forget = batch["forget"]
        original = self.frozen(self.models.reference, forget)
        augmented = self.frozen(self.models.extra["augmented"], forget)
        o = self.options
        value = self.head.rkld(self.student(forget), original, augmented, alpha=o.alpha)
        return self.add_retain(batch, o.forget_weight * value, {"rkld": value.detach()}, o.retain_loss,
                               o.retain_weight, o.masking)


def _augment_as_adapter(models: Models, config) -> bool:
    """Whether the augmented model can be a second adapter: the reference is the LoRA
    student with its adapters off, and the student is not sharded by FSDP."""
    from ..distributed import fsdp_requested
    reference = models.reference
    if not (isinstance(reference, lora.WithoutAdapters) and reference._adapter is None
            and reference._root is models.student):
        return False
    several = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    return not (several and fsdp_requested(config.fsdp))
