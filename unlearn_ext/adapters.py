"""EUL's unlearning layers (arXiv 2310.20150): bottleneck adapters after every feed-forward
block, their per-layer input Gram matrices, and their closed-form fusion.

An unlearning layer maps the feed-forward block's output ``x`` to
``x + W_up·relu(W_down·x + b_down) + b_up``; the up-projection starts at zero, so a fresh
layer leaves the model unchanged. The layers live in one module attached to the model as
``model.unlearning_layers`` (so DDP/FSDP and state dicts see their parameters) and act
through forward hooks on each decoder layer's feed-forward module; ``disabled()``
switches them off, which turns the student back into its own teacher.

Fusion (the paper's sequential requests): adapters trained on separate forget sets are
merged one linear layer at a time by solving
``min_W Σ_i ‖X_i W − X_i W_i‖²``, i.e. ``W = (Σ_i X_iᵀX_i)⁻¹ Σ_i X_iᵀX_i W_i``, where
``X_i`` holds that linear layer's inputs on forget set ``i`` (with a column of ones, so
the bias is fused too). Only the Gram matrices ``X_iᵀX_i`` are kept, in float64. A ridge
term ``ρ·mean(diag(ΣG))·I`` keeps the solve stable when some input direction never
occurs (e.g. a ReLU unit that never fires); ρ = 0 gives the exact least-squares solution.

Saved models (:func:`save_unlearning_layers`): the backbone's weights stay in
``model.safetensors`` and the layers go beside them, but ``config.json`` no longer says
the backbone's model type: it says ``unlearn_ext_eul`` (the backbone's type is kept as
``base_model_type``) and maps transformers' auto classes to a small module written into
the directory (``unlearn_ext_eul.py``). So plain transformers never loads such a directory
as the untouched backbone: ``AutoModelForCausalLM.from_pretrained(dir)`` refuses ("contains
custom code ... trust_remote_code=True"), and with ``trust_remote_code=True`` it loads the
backbone *with* its unlearning layers (the module needs unlearn_ext installed).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ATTRIBUTE = "unlearning_layers"
WEIGHTS_FILE = "unlearning_layers.safetensors"
CONFIG_FILE = "unlearning_layers.json"
_FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


class UnlearningLayer(torch.nn.Module):
    """``x + up(relu(down(x)))`` with ``up`` initialised to zero."""

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, bottleneck)
        self.up = torch.nn.Linear(bottleneck, hidden_size)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class UnlearningLayers(torch.nn.Module):
    """One unlearning layer per decoder layer, applied by hooks while ``enabled``."""

    def __init__(self, hidden_size: int, bottleneck: int, num_layers: int):
        super().__init__()
        self.config = {"hidden_size": hidden_size, "bottleneck": bottleneck, "num_layers": num_layers}
        self.layers = torch.nn.ModuleList(UnlearningLayer(hidden_size, bottleneck) for _ in range(num_layers))
        self.enabled = True

    @contextlib.contextmanager
    def disabled(self):
        """The backbone alone (EUL's teacher)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def apply(self, index: int, output):
        if not self.enabled:
            return output
        if isinstance(output, tuple):  # e.g. mixture-of-experts blocks return (hidden, router logits)
            return (self.layers[index](output[0]), *output[1:])
        return self.layers[index](output)


def feed_forward_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The feed-forward module of each decoder layer of a Hugging Face causal LM."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            blocks = [next((getattr(layer, n) for n in _FEED_FORWARD_NAMES if hasattr(layer, n)), None)
                      for layer in module]
            if all(b is not None for b in blocks):
                return blocks
    raise ValueError(f"cannot find the feed-forward block ({', '.join(_FEED_FORWARD_NAMES)}) of each decoder "
                     f"layer of {type(model).__name__}")


def attach_unlearning_layers(model: torch.nn.Module, bottleneck: int) -> UnlearningLayers:
    """Add fresh unlearning layers to ``model`` (in place) and return them."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError("this model already has unlearning layers")
    blocks = feed_forward_blocks(model)
    reference = next(model.parameters())
    layers = UnlearningLayers(model.config.hidden_size, bottleneck, len(blocks)).to(reference.device,
                                                                                     reference.dtype)
    setattr(model, ATTRIBUTE, layers)
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda module, inputs, output, i=index: layers.apply(i, output))
    return layers


def unlearning_layers(model: torch.nn.Module) -> UnlearningLayers | None:
    return getattr(model, ATTRIBUTE, None)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to the unlearning layers."""
    return key.startswith(ATTRIBUTE + ".")


def _linears(layers: UnlearningLayers):
    for i, layer in enumerate(layers.layers):
        yield f"layers.{i}.down", layer.down
        yield f"layers.{i}.up", layer.up


@torch.no_grad()
def collect_grams(model: torch.nn.Module, layers: UnlearningLayers, batches) -> dict[str, torch.Tensor]:
    """``X̃ᵀX̃`` (float64, CPU) of each linear layer's inputs over the non-padding tokens of
    ``batches`` (dicts with ``input_ids`` and ``attention_mask``), ``X̃ = [X, 1]``."""
    grams: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0][mask["tokens"]].double()
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            gram = (x.T @ x).cpu()
            grams[name] = grams[name] + gram if name in grams else gram
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in _linears(layers)]
    try:
        for batch in batches:
            mask["tokens"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


def fuse(states: list[dict[str, torch.Tensor]], grams: list[dict[str, torch.Tensor]],
         ridge: float = 1e-4) -> dict[str, torch.Tensor]:
    """Merge unlearning layers trained on separate forget sets (``states[i]`` is the
    ``state_dict()`` of request i's :class:`UnlearningLayers`, ``grams[i]`` its
    :func:`collect_grams`): ``W = (ΣG_i + ρ̃I)⁻¹ Σ G_i W̃_i`` per linear layer, where
    ``W̃ = [Wᵀ; b]`` and ρ̃ = ``ridge``·mean(diag ΣG_i)."""
    if not states or len(states) != len(grams):
        raise ValueError(f"need one Gram dict per adapter state, got {len(states)} states and {len(grams)} grams")
    fused = {}
    for name in grams[0]:
        total = sum(g[name] for g in grams)
        rhs = 0
        for state, gram in zip(states, grams):
            stacked = torch.cat([state[f"{name}.weight"].double().T, state[f"{name}.bias"].double()[None]], dim=0)
            rhs = rhs + gram[name] @ stacked
        reg = ridge * total.diagonal().mean() * torch.eye(total.shape[0], dtype=total.dtype)
        solution = torch.linalg.solve(total + reg, rhs)
        dtype = states[0][f"{name}.weight"].dtype
        fused[f"{name}.weight"] = solution[:-1].T.contiguous().to(dtype)
        fused[f"{name}.bias"] = solution[-1].contiguous().to(dtype)
    return fused


MODEL_TYPE = "unlearn_ext_eul"
AUTO_MODULE = "unlearn_ext_eul"
_AUTO_MODULE_SOURCE = '''"""Loads this directory's model WITH its EUL unlearning layers (written by unlearn_ext).

    AutoModelForCausalLM.from_pretrained(this_directory, trust_remote_code=True)

Without the layers the model would be the backbone before unlearning.
"""
from unlearn_ext import adapters


class EULConfig:
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        pass

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        return adapters.backbone_config(directory, keep_auto_map=True, **kwargs)


class EULForCausalLM:
    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        pass

    @classmethod
    def from_pretrained(cls, directory, *args, **kwargs):
        return adapters.from_pretrained_with_layers(directory, *args, **kwargs)
'''


def save_unlearning_layers(model: torch.nn.Module, directory: str | Path) -> None:
    """Write the model's unlearning layers (if any) into ``directory`` and, when a backbone
    is saved there, mark its ``config.json`` so that plain transformers cannot load it
    as the backbone alone (see the module's docstring)."""
    layers = unlearning_layers(model)
    if layers is None:
        return
    directory = Path(directory)
    save_file({k: v.detach().cpu().contiguous() for k, v in layers.state_dict().items()},
              str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(layers.config))
    config_path = directory / "config.json"
    if not config_path.is_file():  # the layers alone (no backbone saved here): nothing to mark
        return
    config = json.loads(config_path.read_text())
    config.update(base_model_type=config["model_type"], model_type=MODEL_TYPE,
                  auto_map={"AutoConfig": f"{AUTO_MODULE}.EULConfig",
                            "AutoModelForCausalLM": f"{AUTO_MODULE}.EULForCausalLM"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / f"{AUTO_MODULE}.py").write_text(_AUTO_MODULE_SOURCE)


def has_unlearning_layers(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_FILE).exists()


def backbone_config(directory: str | Path, keep_auto_map: bool = False, **kwargs):
    """The backbone's configuration of a directory written by :func:`save_unlearning_layers`
    (``kwargs`` as ``PretrainedConfig.from_pretrained`` takes them). ``keep_auto_map``:
    for transformers' auto classes, which then hand the loading to this module."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    kwargs.pop("trust_remote_code", None)
    config_dict, kwargs = PretrainedConfig.get_config_dict(str(directory), **kwargs)
    base_type = config_dict.pop("base_model_type", None)
    if config_dict.get("model_type") != MODEL_TYPE or base_type is None:
        raise ValueError(f"{directory}: config.json is not that of a model with EUL unlearning layers")
    if not keep_auto_map:
        config_dict.pop("auto_map", None)
    config_dict["model_type"] = base_type
    return CONFIG_MAPPING[base_type].from_dict(config_dict, **kwargs)


def from_pretrained_with_layers(directory: str | Path, *args, config=None, **kwargs):
    """The backbone saved in ``directory`` with its unlearning layers attached."""
    from transformers import AutoModelForCausalLM
    kwargs.pop("trust_remote_code", None)
    kwargs.pop("adapter_kwargs", None)
    if config is None or getattr(config, "model_type", None) == MODEL_TYPE:
        config = backbone_config(directory)
    if hasattr(config, "auto_map"):
        del config.auto_map
    model = AutoModelForCausalLM.from_pretrained(directory, *args, config=config, **kwargs)
    load_unlearning_layers(model, directory)
    return model


def load_unlearning_layers(model: torch.nn.Module, directory: str | Path) -> UnlearningLayers | None:
    """Attach the unlearning layers saved in ``directory`` (None if there are none)."""
    directory = Path(directory)
    if not has_unlearning_layers(directory):
        return None
    config = json.loads((directory / CONFIG_FILE).read_text())
    layers = attach_unlearning_layers(model, config["bottleneck"])
    layers.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return layers
