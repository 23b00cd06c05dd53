"""RMU — Representation Misdirection for Unlearning (WMDP, arXiv 2403.03218).

At one decoder layer ℓ, the student's activations (the layer's output hidden states) on
forget answer tokens are pushed toward c·u — u a fixed random unit vector, c the steering
coefficient — and its activations on retain answer tokens are held to the frozen starting
model's:

    loss = w_f·MSE(h_ℓ(forget), c·u) + w_r·MSE(h_ℓ(retain), h_ℓ^ref(retain))

each MSE a mean over hidden units, then over a sequence's answer tokens, then over the
sequences (open-unlearning's ``compute_activation_loss``; WMDP's code, on plain text,
averages over every token). u is drawn as both codes draw it, ``rand`` (uniform in
[0, 1)^H) normalised, from the run's seed. Activations come from a forward hook on layer
ℓ; the logits are never needed, so RMU uses no row op and runs the same on both heads.

Defaults: WMDP's Zephyr-7B run (its README: ``--steering_coeffs 6.5 --alpha 1200 --lr 5e-5``,
layer 7 of 32, the MLPs of layers 5–7 trained — their down-projections, ``param_ids [6]``;
pass that regex as ``trainable`` to train exactly those), the layer at a third of the depth
(DESIGN.md) unless ``layer`` is given. open-unlearning's ``RMU`` config differs: ``gamma 1``,
``alpha 1``, ``steering_coeff 2``, layer 7, every parameter trained. Both codes say c and α
depend on the model: c must dominate the activation norm at ℓ, which grows with depth and size.

open-unlearning's names: ``gamma`` = ``forget_weight``, ``alpha`` = ``retain_weight``,
``steering_coeff`` = ``steering_coeff``, ``module_regex`` → ``layer`` (an index),
``trainable_params_regex`` → ``trainable``.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from ..adapters import feed_forward_blocks
from ..reference import IGNORE_INDEX
from ..train_layers import decoder_blocks
from .base import Method, option


@dataclass
class RMUOptions:
    layer: int = option(-1, "decoder layer ℓ (0-based) whose output is steered; -1: a third of the depth")
    steering_coeff: float = option(6.5, "c, length of the control vector c·u (WMDP: 6.5 on Zephyr-7B; "
                                        "open-unlearning: 2); it must dominate the activation norm at ℓ")
    forget_weight: float = option(1.0, "w_f, weight of the forget activation MSE to c·u")
    retain_weight: float = option(1200.0, "α, weight of the retain activation MSE to the frozen model "
                                          "(WMDP: 1200 on Zephyr-7B; open-unlearning: 1)")
    trainable: str = option("mlp", "what trains: mlp = the MLPs of layers ℓ-2..ℓ (WMDP), all = every parameter "
                                   "(open-unlearning's config), or a regex over full parameter names")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM: ``get_decoder().layers`` where the
    model has it (a LoRA reference view reaches the student's layers that way: it holds
    them unregistered), else its ModuleList of ``num_hidden_layers`` modules."""
    if hasattr(model, "get_decoder"):
        return decoder_blocks(model)
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of "
                     f"config.num_hidden_layers = {count} modules)")


@contextlib.contextmanager
def layer_output(module: torch.nn.Module):
    """Collects ``module``'s output hidden states (the first element of a tuple output) while open."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda mod, inputs, output: outputs.append(output[0] if isinstance(output, tuple) else output))
    try:
        yield outputs
    finally:
        handle.remove()


def activation_mse(x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(x − target)² averaged over hidden units, then over each sequence's answer tokens
    (``labels`` ≠ −100, unshifted: the activation *at* an answer token), then over sequences."""
    per_token = (x.float() - target.float()).square().mean(-1)
    mask = (labels != IGNORE_INDEX).to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


class RMU(Method):
    name = "rmu"
    Options = RMUOptions
    open_unlearning_names = {"gamma": "forget_weight", "alpha": "retain_weight", "module_regex": "layer",
                             "trainable_params_regex": "trainable"}

    def needs_reference(self):
        return self.options.retain_weight != 0

    def needs_retain(self):
        return self.options.retain_weight != 0

    def prepare(self, models, data):
        from ..trainer import derive_seed  # the trainer imports the methods
        super().prepare(models, data)
        o, student = self.options, models.student
        layers = decoder_layers(student)
        index = len(layers) // 3 if o.layer == -1 else o.layer
        if not 0 <= index < len(layers):
            raise ValueError(f"option 'layer': {o.layer} is not a decoder layer of this model "
                             f"(it has {len(layers)}: 0 to {len(layers) - 1})")
        self.layer = index
        self.student_layer = layers[index]
        self.reference_layer = decoder_layers(models.reference)[index] if models.reference is not None else None
        self._select_trainable(student, index)
        g = torch.Generator().manual_seed(derive_seed(data.seed, "rmu control vector"))
        u = torch.rand(student.config.hidden_size, generator=g, dtype=torch.float64)
        self.control = (o.steering_coeff * u / u.norm()).float()

    def _select_trainable(self, student, index: int) -> None:
        choice = self.options.trainable
        if choice == "all":
            return
        if choice == "mlp":
            blocks = feed_forward_blocks(student)[max(0, index - 2):index + 1]
            chosen = {id(p) for block in blocks for p in block.parameters()}
            selected = [p for p in student.parameters() if id(p) in chosen]
        else:
            try:
                pattern = re.compile(choice)
            except re.error as e:
                raise ValueError(f"option 'trainable': {choice!r} is neither mlp, all nor a regex ({e})") from None
            selected = [p for n, p in student.named_parameters() if pattern.fullmatch(n)]
            if not selected:
                raise ValueError(f"option 'trainable': the regex {choice!r} matches no parameter name "
                                 f"(e.g. {next(n for n, _ in student.named_parameters())!r})")
        # Within what already trains: under LoRA only the adapters of the chosen modules, so
        # the base weights stay frozen; with --train-layers, its blocks.
        selected = [p for p in selected if p.requires_grad]
        if not selected:
            raise ValueError(f"option 'trainable': {choice!r} selects no parameter that trains here "
                             "(LoRA targets or train_layers leave none in those modules)")
        student.requires_grad_(False)
        for p in selected:
            p.requires_grad_(True)

    def activations(self, model, layer, part) -> torch.Tensor:
        with layer_output(layer) as outputs:
            self.head.run(model, part)
        return outputs[-1]  # the fused head's first call on a model also runs a short verification

    def loss(self, batch):
        o, forget = self.options, batch["forget"]
        acts = self.activations(self.models.student, self.student_layer, forget)
        target = self.control.to(acts.device, acts.dtype).expand_as(acts)
        forget_mse = activation_mse(acts, target, forget["labels"])
        with torch.no_grad():  # to choose c: it must dominate this norm
            mask = forget["labels"] != IGNORE_INDEX
            norm = acts.float().norm(dim=-1)[mask].mean()
        value, logs = o.forget_weight * forget_mse, {"forget_mse": forget_mse.detach(), "forget_activation_norm": norm}
        if o.retain_weight != 0:
            retain = batch["retain"]
            acts = self.activations(self.models.student, self.student_layer, retain)
            with torch.no_grad():
                frozen = self.activations(self.models.reference, self.reference_layer, retain)
            retain_mse = activation_mse(acts, frozen, retain["labels"])
            value = value + o.retain_weight * retain_mse
            logs["retain_mse"] = retain_mse.detach()
        return value, logs
