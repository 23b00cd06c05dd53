"""Which parameters train: ``--train-layers`` ("all", "top:N", "bottom:N" or "A-B").

Freezing the lower transformer blocks is the cheapest lever on a real model: the backward
pass stops at the lowest trained block, and unlearning mostly needs the upper ones (the
demo trains the top 10 of SmolLM2's 30 blocks). Blocks are counted from the input (block
0 is the lowest); embeddings, the final norm and the output head stay frozen unless every
layer trains ("all").
"""
from __future__ import annotations

import re

import torch

_SPEC = re.compile(r"^(?:(top|bottom):(\d+)|(\d+)-(\d+))$")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a Hugging Face causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (model.get_decoder().layers)")
    return blocks


def block_range(spec: str, num_blocks: int) -> range:
    """The blocks ``spec`` selects: "all", "top:N" (the N highest), "bottom:N" or "A-B"
    (blocks A to B inclusive, counted from 0 at the input)."""
    text = str(spec).strip().lower()
    if text == "all":
        return range(num_blocks)
    found = _SPEC.match(text)
    if not found:
        raise ValueError(f"train_layers: expected 'all', 'top:N', 'bottom:N' or 'A-B', got {spec!r}")
    if found.group(1):
        n = int(found.group(2))
        if not 1 <= n <= num_blocks:
            raise ValueError(f"train_layers {spec!r}: N must be in [1, {num_blocks}] (the model has {num_blocks} "
                             "blocks)")
        return range(num_blocks - n, num_blocks) if found.group(1) == "top" else range(n)
    first, last = int(found.group(3)), int(found.group(4))
    if not 0 <= first <= last < num_blocks:
        raise ValueError(f"train_layers {spec!r}: need 0 <= A <= B < {num_blocks}")
    return range(first, last + 1)


def select_train_layers(model: torch.nn.Module, spec: str | None) -> None:
    """Freeze every parameter of ``model`` except those of the blocks ``spec`` selects
    (None or "all": leave ``requires_grad`` as it is)."""
    if spec is None or str(spec).strip().lower() == "all":
        return
    blocks = decoder_blocks(model)
    chosen = block_range(spec, len(blocks))
    model.requires_grad_(False)
    for index in chosen:
        blocks[index].requires_grad_(True)
