"""LoRA for every method, through PEFT, on the Hugging Face model in place.

    config = attach_lora(model, LoraOptions(r=8, alpha=16))   # only the adapters train
    reference = WithoutAdapters(model)                        # the starting model, no second copy

PEFT's layers are injected into the model itself (``peft.inject_adapter_in_model``), not
behind a ``PeftModel`` wrapper, so the model keeps its class: ``lm_head_inputs`` still
finds its base model and LM head, and the trainer wraps it like any other. The LM head
stays frozen (not a default target), so the fused-linear losses form no ``d_weight``.
With ``train_layers`` (``LoraOptions.layers``) only the selected blocks get adapters.

Since LoRA's up-projection starts at zero, the model with its adapters disabled *is* the
starting model: NPO's, UnDIAL's and KL's reference is :class:`WithoutAdapters`, a view of
the student that runs it with the adapters switched off. Adapters are saved in PEFT's
format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained``); :func:`merged_state_dict` folds them into the
weights for a plain model. RKLD's augmented model is a second adapter on the same base
(:func:`add_adapter`, :class:`TrainAdapter` to fine-tune it, ``WithoutAdapters(model,
name)`` to run it as a frozen teacher).
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
    layers: str | None = None   # train_layers ("top:N", "A-B", …): adapters only in those blocks; None: all


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
                        target_modules=list(parse_targets(options.targets)), bias="none", task_type="CAUSAL_LM",
                        **_layer_selection(model, options.layers))
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


def _layer_selection(model: torch.nn.Module, spec: str | None) -> dict:
    """PEFT's ``layers_to_transform`` / ``layers_pattern`` for ``train_layers``: adapters
    only in the selected blocks (the rest of the model stays frozen as it is)."""
    from .train_layers import block_range, decoder_blocks
    if spec is None or str(spec).strip().lower() == "all":
        return {}
    blocks = decoder_blocks(model)
    pattern = next(name.rpartition(".")[2] for name, m in model.named_modules() if m is blocks)
    return {"layers_to_transform": list(block_range(spec, len(blocks))), "layers_pattern": pattern}


@contextlib.contextmanager
def adapter_active(model: torch.nn.Module, adapter: str | None):
    """Runs ``model`` with only ``adapter`` active (None: no adapter, the base model).
    Sets PEFT's flags directly: its ``set_adapter`` and ``enable_adapters`` also flip the
    adapters' ``requires_grad``, which must not change inside a DDP/FSDP forward (DDP
    registered its hooks by it)."""
    layers = _tuner_layers(model)
    before = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
    for layer in layers:
        layer._disable_adapters = adapter is None
        if adapter is not None:
            layer._active_adapter = [adapter]
    try:
        yield
    finally:
        for layer, (off, active) in zip(layers, before):
            layer._disable_adapters, layer._active_adapter = off, active


def adapters_disabled(model: torch.nn.Module):
    """Runs ``model`` as if it had no adapters."""
    return adapter_active(model, None)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """No dropout (the base model's or an adapter's) in a frozen model's forward, although
    the student it views trains; the flags are restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class _View(torch.nn.Module):
    """``module`` (the student or its base model), run as a frozen model: with only
    ``root``'s adapter ``adapter`` active (None: none), in eval mode. Holds them
    unregistered: a view owns none of their parameters, so nothing is moved, frozen or
    counted twice."""

    def __init__(self, module: torch.nn.Module, root: torch.nn.Module, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_adapter", adapter)

    def forward(self, *args, **kwargs):
        with adapter_active(self._root, self._adapter), _eval_mode(self._root):
            return self._module(*args, **kwargs)

    def __getattr__(self, name):  # config, logit_scale, …: the viewed module's
        return getattr(object.__getattribute__(self, "_module"), name)


class WithoutAdapters(_View):
    """The student with its LoRA adapters disabled (``adapter=None``), usable wherever a
    frozen copy of the starting model is (``Models.reference``): forward, ``base_model``
    and ``get_output_embeddings`` for ``lm_head_inputs``. With ``adapter``: the student's
    base with that other adapter instead of its own (RKLD's augmented model). ``copy.deepcopy``
    of the view is a real, independent copy of the model it shows."""

    def __init__(self, model: torch.nn.Module, adapter: str | None = None):
        super().__init__(model, model, adapter)
        # Code that asks a model for its device (next(model.parameters()).device) gets it
        # from this empty, frozen parameter, moved with the view.
        self.device_marker = torch.nn.Parameter(torch.empty(0, device=next(model.parameters()).device),
                                                requires_grad=False)

    @property
    def base_model(self):
        return _View(self._module.base_model, self._root, self._adapter)

    def get_output_embeddings(self):
        return self._module.get_output_embeddings()

    def __deepcopy__(self, memo):
        if self._adapter is not None:
            raise TypeError(f"a copy of the view of adapter {self._adapter!r}: merge it first")
        return without_lora(copy.deepcopy(self._module, memo))


class TrainAdapter(torch.nn.Module):
    """The student's base with its other adapter ``adapter`` active, as a model that
    trains (RKLD fine-tunes its augmented model so): the student is registered, so
    its parameters are this module's, and ``requires_grad`` says which train (see
    :func:`training_only`). Train/eval mode is the caller's, dropout included."""

    def __init__(self, model: torch.nn.Module, adapter: str):
        super().__init__()
        self.model = model
        self.adapter = adapter
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, *args, **kwargs):
        with adapter_active(self.model, self.adapter):
            return self.model(*args, **kwargs)

    @property
    def base_model(self):
        return _TrainView(self.model.base_model, self.model, self.adapter)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def __getattr__(self, name):  # config, gradient_checkpointing_enable, …: the student's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class _TrainView(_View):
    """A view that keeps the train/eval mode of the model it shows (for :class:`TrainAdapter`)."""

    def forward(self, *args, **kwargs):
        with adapter_active(self._root, self._adapter):
            return self._module(*args, **kwargs)


def add_adapter(model: torch.nn.Module, name: str) -> None:
    """A second LoRA adapter ``name`` beside the student's (same rank, targets and scale;
    its up-projection at zero, so the model with it active starts as the base model),
    frozen; the student's adapter stays the active one. Its initialisation draws from the
    global RNG."""
    import warnings

    from peft import inject_adapter_in_model
    config = lora_config(model)
    if config is None:
        raise ValueError("add_adapter: the model has no LoRA adapters (attach_lora first)")
    if name == ADAPTER_NAME or name in getattr(model, "peft_config", {}):
        raise ValueError(f"add_adapter: the model already has an adapter {name!r}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    active = [(layer, layer._active_adapter) for layer in _tuner_layers(model)]
    with warnings.catch_warnings():  # PEFT warns that the model already has a peft_config: that is the point
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter_in_model(config, model, adapter_name=name)
    for layer, before in active:  # PEFT makes the new adapter the active one
        layer._active_adapter = before
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)


def delete_adapter(model: torch.nn.Module, name: str) -> None:
    """Removes the extra adapter ``name`` (the student's stays active)."""
    for layer in _tuner_layers(model):
        if name in layer.lora_A:
            active = layer._active_adapter
            layer.delete_adapter(name)
            layer._active_adapter = active
    getattr(model, "peft_config", {}).pop(name, None)


@contextlib.contextmanager
def training_only(model: torch.nn.Module, adapter: str):
    """Only ``adapter``'s weights require grad inside; the flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for n, p in model.named_parameters():
        p.requires_grad_(f".{adapter}." in n and ".lora_" in n)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


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
            for k, v in state.items() if ".lora_" in k and f".{ADAPTER_NAME}." in k}


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
