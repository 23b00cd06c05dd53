"""LoRA for every method, through PEFT, on the Hugging Face model in place.

    config = attach_lora(model, LoraOptions(r=8, alpha=16))   # only the adapters train
    reference = WithoutAdapters(model)                        # the starting model, no second copy

PEFT's layers are injected into the model itself (``peft.inject_adapter_in_model``), not
behind a ``PeftModel`` wrapper, so the model keeps its class: ``lm_head_inputs`` still
finds its base model and LM head, and the trainer wraps it like any other. The LM head
stays frozen (not a default target), so the fused-linear losses form no ``d_weight``.

Since LoRA's up-projection starts at zero, the model with its adapters disabled *is* the
starting model: NPO's, UnDIAL's and KL's reference is :class:`WithoutAdapters`, a view of
the student that runs it with the adapters switched off. Adapters are saved in PEFT's
format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained``); :func:`merged_state_dict` folds them into the
weights for a plain model.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

# The attention and MLP projections of Llama-style models (Llama, Qwen2, Mistral, Gemma, SmolLM2).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"
_CONFIG_ATTR = "_unlearn_ext_lora_config"


@dataclass
class LoraOptions:
    r: int = 8                  # rank (UnDIAL's and 2404.16841's larger runs: r = 8, alpha = 16)
    alpha: float = 16.0         # scale alpha / r on the adapters' product
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names (suffixes) that get adapters


def parse_targets(value) -> tuple[str, ...]:
    """``--lora-targets q_proj,v_proj`` or a YAML list."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(n.strip() for n in names if n.strip())
    if not names:
        raise ValueError("lora_targets: give at least one module name (e.g. q_proj,v_proj)")
    return names


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model) -> bool:
    return getattr(model, _CONFIG_ATTR, None) is not None


def attach_lora(model: torch.nn.Module, options: LoraOptions):
    """Freezes ``model`` and injects LoRA adapters into the ``options.targets`` modules;
    returns PEFT's ``LoraConfig``. The adapters' initialisation draws from the global RNG."""
    from peft import LoraConfig, inject_adapter_in_model
    if not isinstance(options.r, int) or isinstance(options.r, bool) or options.r < 1:
        raise ValueError(f"lora_r must be a positive int, got {options.r!r}")
    if not options.alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {options.alpha!r}")
    if not 0 <= options.dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {options.dropout!r}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(parse_targets(options.targets)), bias="none", task_type="CAUSAL_LM")
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_targets {list(config.target_modules)}: {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    # Reentrant gradient checkpointing only back-propagates into a checkpointed block whose
    # inputs require grad; with the embeddings frozen nothing would train (open-unlearning #178).
    if getattr(model, "_require_grads_hook", None) is None:  # transformers adds it with checkpointing too
        model.enable_input_require_grads()
    setattr(model, _CONFIG_ATTR, config)
    return config


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Runs ``model`` as if it had no adapters. Sets PEFT's flag directly: its
    ``enable_adapters`` also flips the adapters' ``requires_grad``, which must not change
    inside a DDP/FSDP forward (DDP registered its hooks by it)."""
    layers = _tuner_layers(model)
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, off in zip(layers, before):
            layer._disable_adapters = off


class _Disabled(torch.nn.Module):
    """``module`` (the student or its base model), run with ``root``'s adapters disabled.
    Holds them unregistered: a view owns none of their parameters, so nothing is moved,
    frozen or counted twice."""

    def __init__(self, module: torch.nn.Module, root: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_root", root)

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._root):
            return self._module(*args, **kwargs)

    def __getattr__(self, name):  # config, logit_scale, …: the viewed module's
        return getattr(object.__getattribute__(self, "_module"), name)


class WithoutAdapters(_Disabled):
    """The student with its LoRA adapters disabled, usable wherever a frozen copy of the
    starting model is (``Models.reference``): forward, ``base_model`` and
    ``get_output_embeddings`` for ``lm_head_inputs``. ``copy.deepcopy`` of it is a real,
    independent copy of the starting model (RKLD fine-tunes one)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model, model)
        # Code that asks a model for its device (next(model.parameters()).device) gets it
        # from this empty, frozen parameter, moved with the view.
        self.device_marker = torch.nn.Parameter(torch.empty(0, device=next(model.parameters()).device),
                                                requires_grad=False)

    @property
    def base_model(self):
        return _Disabled(self._module.base_model, self._root)

    def get_output_embeddings(self):
        return self._module.get_output_embeddings()

    def __deepcopy__(self, memo):
        return without_lora(copy.deepcopy(self._module, memo))


def without_lora(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LoRA layers replaced by the layers they wrap (adapters dropped,
    not merged), in place; trainable again like a fresh model."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "get_base_layer") and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # set by inject_adapter_in_model
        del model.peft_config
    if has_lora(model):
        delattr(model, _CONFIG_ATTR)
        if getattr(model, "_require_grads_hook", None) is not None:
            model.disable_input_require_grads()
    return model.requires_grad_(True)


def _lora_prefixes(state: dict) -> list[str]:
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    return [k[:-len(suffix)] for k in state if k.endswith(suffix)]


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a full state dict, under PEFT's saved names
    (``base_model.model.<module>.lora_A.weight``)."""
    return {"base_model.model." + k.replace(f".{ADAPTER_NAME}.", "."): v.contiguous()
            for k, v in state.items() if ".lora_" in k}


def merged_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A full state dict of the LoRA model as the plain model's: ``W + (alpha/r)·B·A`` for
    every adapted layer (float32 product), the base layers under their own names."""
    scale = config.lora_alpha / config.r
    merged = {}
    for prefix in _lora_prefixes(state):
        a, b = state[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"], state[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"]
        w = state[f"{prefix}.base_layer.weight"]
        merged[f"{prefix}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    for key, value in state.items():
        if ".lora_" in key or key.replace(".base_layer.", ".") in merged:
            continue
        merged[key.replace(".base_layer.", ".")] = value
    return merged


def save_adapters(state: dict[str, torch.Tensor], config, directory: Path) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` in ``directory`` (PEFT's format)."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(state), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(directory))


def lora_config(model):
    """The ``LoraConfig`` :func:`attach_lora` gave ``model`` (None without LoRA)."""
    return getattr(model, _CONFIG_ATTR, None)
