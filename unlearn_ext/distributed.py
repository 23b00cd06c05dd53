"""What DDP and FSDP wrap: the student, with the method's loss as its forward.

DDP synchronises the gradients of a forward run through its wrapper, and FSDP gathers a
unit's parameters in that unit's forward and frees them after it: a loss computed from
``lm_head_inputs`` (the LM head's weight, not its output) outside the wrapped forward
would bypass both. So the trainer wraps :class:`LossForward`, whose forward *is*
``method.loss(batch)``: the student, its LM head and the fused-linear loss all run inside
(Liger-Kernel's design: its fused losses run inside the model's forward). Methods keep
calling ``models.student`` (the bare model) through their head, unchanged.

FSDP is FSDP2 (``fully_shard``), applied here rather than by accelerate (whose FSDP does
not run on CPU processes, and would wrap from its own policy): each decoder layer is a
unit, the root unit (``LossForward``) holds the embeddings, the final norm and the LM
head, gathered for the whole forward — where the fused loss reads the head's weight.
Frozen models may be sharded too (:func:`shard_frozen`), layer by layer, so a large
reference need not fit one device.
"""
from __future__ import annotations

import contextlib
import os

import torch


class LossForward(torch.nn.Module):
    """``forward(batch) -> (loss, logs)`` = ``loss_fn(batch)``, with the student as the
    only registered submodule (its parameters are this module's)."""

    def __init__(self, student: torch.nn.Module, loss_fn):
        super().__init__()
        self.student = student
        self.loss_fn = loss_fn  # a bound method, not a module: nothing registered
        # accelerate's and FSDP's wrapping policies read the layer classes from here.
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def forward(self, batch: dict):
        return self.loss_fn(batch)


def fsdp_requested(option: bool | None) -> bool:
    """``option``, or when None whether ``accelerate launch --use_fsdp`` (which sets
    ACCELERATE_USE_FSDP) started this process."""
    if option is not None:
        return option
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes it names in ``_no_split_modules``
    (Hugging Face models do, e.g. ``LlamaDecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]  # FSDP subclasses too
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): "
                         "cannot shard it with FSDP")
    return layers


def shard_for_training(wrapper: LossForward) -> LossForward:
    """FSDP2 on the student: one unit per decoder layer, the root on ``wrapper``. The
    student's parameter objects are replaced (by DTensors): build the optimizer after."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(wrapper.student):
        fully_shard(layer)
    fully_shard(wrapper)
    return wrapper


def shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on a frozen model's decoder layers only, each gathered for its forward and
    freed after it. The embeddings, norm and LM head stay whole on every process: the
    fused losses read the head's weight after the model's forward."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    return model


def unshard_root(wrapper: torch.nn.Module) -> None:
    """After training under FSDP: gather the root unit's parameters (embeddings, norm,
    head) for good, so the student can be run on its own again (evaluation, RKLD's
    augmented model as a teacher); its layers still gather themselves per forward."""
    if hasattr(wrapper, "unshard"):
        wrapper.unshard()


@contextlib.contextmanager
def root_gathered(wrapper: torch.nn.Module):
    """Under FSDP, the root unit's parameters gathered for a while (an evaluation during
    training runs the bare student, outside the wrapper's forward), then sharded again;
    elsewhere nothing. Every process must enter it (the gather is collective)."""
    if not hasattr(wrapper, "unshard"):
        yield
        return
    # Before the first training step the root has not run its forward, which is where FSDP
    # sets itself up (and makes the wrapper the root: a decoder layer run first would claim
    # that role and fail the first step). Set it up now.
    wrapper._get_fsdp_state()._lazy_init()
    wrapper.unshard()
    try:
        yield
    finally:
        wrapper.reshard()
