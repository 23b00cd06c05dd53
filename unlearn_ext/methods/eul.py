"""EUL — Efficient Unlearning for LLMs (Chen & Yang, EMNLP 2023, arXiv 2310.20150).

The backbone is frozen; an unlearning layer (bottleneck adapter, :mod:`unlearn_ext.adapters`)
follows the feed-forward block of every transformer layer and only those train. The
teacher is the backbone itself (adapters switched off). Objective, on a forget batch f
and a retain batch r:

    α·KL_r(teacher ‖ student) − min(KL_f(teacher ‖ student), c) + λ·NLL_r − γ·min(NLL_f, c)

with α = 0.8, λ = 1, γ = 0.2 (the paper's). The paper leaves the negative terms
unbounded; this project caps each at ``c = ln V`` (V the vocabulary size) by default: the
NLL of a uniform guess. Past it the model is no longer forgetting but learning to avoid
the true tokens — which itself reveals them and wrecks the model — and the capped term
stops pushing (its gradient is 0 there), so the loss cannot run away.

Sequential requests: train one set of unlearning layers per request (each run keeps its
layers and their input Gram matrices on its forget set in ``<output>/eul/``), then pass
the earlier runs' output directories as ``fuse_with``: after training, this run's layers
are replaced by the closed-form fusion of all of them (:func:`unlearn_ext.adapters.fuse`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import adapters
from ..file_modes import follow_umask
from .base import Method, option

REQUEST_DIR = "eul"


@dataclass
class EULOptions:
    alpha: float = option(0.8, "α, weight of KL(teacher || student) on retain answers")
    lam: float = option(1.0, "λ, weight of the retain NLL")
    gamma: float = option(0.2, "γ, weight of the (capped, negated) forget NLL")
    reduction_factor: int = option(16, "bottleneck width = hidden size / reduction_factor")
    forget_cap: float = option(0.0, "cap c on the forget KL and NLL terms; 0 = ln(vocabulary size)")
    ridge: float = option(1e-4, "relative ridge term of the closed-form fusion")
    fuse_with: str = option("", "comma-separated output directories of earlier EUL runs to fuse with")


class EUL(Method):
    name = "eul"
    Options = EULOptions

    def needs_retain(self):
        return True

    def prepare(self, models, data):
        super().prepare(models, data)
        student = models.student
        student.requires_grad_(False)
        bottleneck = max(1, student.config.hidden_size // self.options.reduction_factor)
        self.layers = adapters.attach_unlearning_layers(student, bottleneck)
        self.cap = self.options.forget_cap or math.log(student.config.vocab_size)
        self.forget_examples, self.collate = data.forget, data.collate
        self.batch_size = getattr(data.train_config, "batch_size", 8)
        self.earlier = [Path(p.strip()) / REQUEST_DIR for p in self.options.fuse_with.split(",") if p.strip()]
        for folder in self.earlier:  # fail now, not after training
            if not (folder / "layers.safetensors").is_file():
                raise FileNotFoundError(f"fuse_with: {folder.parent} holds no EUL request "
                                        f"({folder / 'layers.safetensors'} is missing)")

    def loss(self, batch):
        o = self.options
        forget, retain = batch["forget"], batch["retain"]
        with self.layers.disabled():
            teacher_f = self.frozen(self.models.student, forget)
            teacher_r = self.frozen(self.models.student, retain)
        student_f, student_r = self.student(forget), self.student(retain)
        kl_r, kl_f = self.head.forward_kl(student_r, teacher_r), self.head.forward_kl(student_f, teacher_f)
        nll_r, nll_f = self.head.cross_entropy(student_r), self.head.cross_entropy(student_f)
        value = (o.alpha * kl_r - kl_f.clamp(max=self.cap) + o.lam * nll_r
                 - o.gamma * nll_f.clamp(max=self.cap))
        return value, {"kl_retain": kl_r.detach(), "kl_forget": kl_f.detach(), "retain_nll": nll_r.detach(),
                       "forget_nll": nll_f.detach()}

    def grams(self) -> dict[str, torch.Tensor]:
        """Gram matrices of this run's layer inputs on its forget set."""
        device = next(self.layers.parameters()).device
        batches = (
            {k: v.to(device) for k, v in self.collate(self.forget_examples[i:i + self.batch_size]).items()}
            for i in range(0, len(self.forget_examples), self.batch_size))
        return adapters.collect_grams(self.models.student, self.layers, batches)

    def finish(self, output_dir, is_main=True):
        """Save this request's layers and Grams; fuse with earlier requests if asked."""
        own_state = {k: v.detach().cpu().contiguous() for k, v in self.layers.state_dict().items()}
        own_grams = self.grams()
        if output_dir is not None and is_main:
            folder = Path(output_dir) / REQUEST_DIR
            folder.mkdir(parents=True, exist_ok=True)
            save_file(own_state, str(folder / "layers.safetensors"))
            save_file(own_grams, str(folder / "grams.safetensors"))
            follow_umask(folder)
        if self.earlier:
            states = [own_state] + [load_file(str(f / "layers.safetensors")) for f in self.earlier]
            grams = [own_grams] + [load_file(str(f / "grams.safetensors")) for f in self.earlier]
            self.layers.load_state_dict(adapters.fuse(states, grams, self.options.ridge))
