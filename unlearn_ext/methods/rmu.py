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

The steering coefficient. WMDP's Zephyr-7B run uses c = 6.5 (its README:
``--steering_coeffs 6.5 --alpha 1200 --lr 5e-5``, layer 7 of 32, the MLPs of layers 5–7
trained — their down-projections, ``param_ids [6]``; pass that regex as ``trainable`` to
train exactly those); its Mixtral run uses c = 300, and open-unlearning's config c = 2: c
only means something relative to the activation norm at ℓ, which differs between models
by orders of magnitude (SmolLM2-135M: ≈ 150 at layer 10, so c = 6.5 leaves the forget
activations where they were and nothing is forgotten — issue 16). The default therefore
sets c from the model: ``steering_coeff = 0`` (default) means c = ``steering_scale`` × the
mean norm of the frozen model's activations at ℓ over the forget answer tokens, measured
once in ``prepare`` (the same idea as Adaptive RMU, which scales c by the frozen
activation norm per input); a positive ``steering_coeff`` is the absolute c (6.5 for
WMDP's setting). Other defaults: WMDP's (α = 1200, lr 5e-5, the MLPs of ℓ−2…ℓ), the layer
at a third of the depth (DESIGN.md) unless ``layer`` is given. open-unlearning's ``RMU``
config differs: ``gamma 1``, ``alpha 1``, ``steering_coeff 2``, layer 7, every parameter trained.

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


SCALE = 2.0  # c = 2 × the activation norm: the target dominates what the layer carried (demo: README)


@dataclass
class RMUOptions:
    layer: int = option(-1, "decoder layer ℓ (0-based) whose output is steered; -1: a third of the depth")
    steering_coeff: float = option(0.0, "c, length of the control vector c·u (WMDP: 6.5 on Zephyr-7B; "
                                        "open-unlearning: 2); 0: steering_scale × the frozen model's mean "
                                        "activation norm at ℓ on the forget answers (measured in prepare)")
    steering_scale: float = option(SCALE, "c / mean activation norm at ℓ when steering_coeff is 0")
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
        if o.steering_coeff < 0 or o.steering_scale <= 0:
            raise ValueError(f"options 'steering_coeff' (>= 0) and 'steering_scale' (> 0): got {o.steering_coeff} "
                             f"and {o.steering_scale}")
        self.steering_coeff = o.steering_coeff or o.steering_scale * self.forget_norm(models, data)
        g = torch.Generator().manual_seed(derive_seed(data.seed, "rmu control vector"))
        u = torch.rand(student.config.hidden_size, generator=g, dtype=torch.float64)
        self.control = (self.steering_coeff * u / u.norm()).float()

    @torch.no_grad()
    def forget_norm(self, models, data, batch_size: int = 16) -> float:
        """Mean ‖h_ℓ‖ of the frozen model (the student before training when there is none)
        over the forget answer tokens."""
        model, layer = ((models.reference, self.reference_layer) if models.reference is not None
                        else (models.student, self.student_layer))
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(data.forget), batch_size):
            part = {k: v.to(device) for k, v in data.collate(list(data.forget[i:i + batch_size])).items()}
            norms = self.activations(model, layer, part).float().norm(dim=-1)[part["labels"] != IGNORE_INDEX]
            total, count = total + float(norms.sum()), count + norms.numel()
        if count == 0:
            raise ValueError("rmu: the forget examples have no answer tokens to measure the activation norm on")
        return total / count

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
        value, logs = o.forget_weight * forget_mse, {"forget_mse": forget_mse.detach(), "forget_activation_norm": norm,
                                                     "steering_coeff": norm.new_tensor(self.steering_coeff)}
        if o.retain_weight != 0:
            retain = batch["retain"]
            acts = self.activations(self.models.student, self.student_layer, retain)
            with torch.no_grad():
                frozen = self.activations(self.models.reference, self.reference_layer, retain)
            retain_mse = activation_mse(acts, frozen, retain["labels"])
            value = value + o.retain_weight * retain_mse
            logs["retain_mse"] = retain_mse.detach()
        return value, logs
