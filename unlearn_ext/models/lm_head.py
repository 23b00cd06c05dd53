"""A Hugging Face causal LM up to its last hidden state, and its LM head as the inputs of a
fused-linear loss, so that a trainer never materialises the [B, T, V] logits.

    head = lm_head_inputs(model, batch["input_ids"], batch["attention_mask"])
    labels = unlearn_ext.shift_labels(batch["labels"])
    loss = unlearn_ext.fused_linear_cross_entropy(head.hidden, head.weight, labels,
                                                  bias=head.bias, softcap=head.softcap)

The base model is the module the causal LM's own forward calls (``model.base_model``:
``model.model`` for Llama, Qwen2, Mistral, Gemma; ``model.gpt_neox`` for GPT-NeoX), its
``last_hidden_state`` is what the LM head reads, and the head is
``model.get_output_embeddings()`` (tied to the input embeddings or not: gradients reach the
shared weight from both uses). What some models do to the head's output is carried over:
Gemma-2/3 ``final_logit_softcapping`` (as ``softcap``), Cohere's ``logit_scale`` and
Granite's / MiniCPM3's ``logits_scaling`` (folded into the hidden states). Anything else
would make the losses silently wrong, so the first call on a model checks that
``model(...).logits`` equals the logits these inputs give, on one short sequence.

Under DDP or FSDP, call this (and the loss) inside the wrapped module's forward: DDP only
synchronises gradients of a forward run through its wrapper, and FSDP frees gathered
weights after the forward.
"""
from __future__ import annotations

import weakref

import torch

from ..fused_linear import LMHeadInputs

_VERIFIED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
VERIFY_TOKENS = 16


def _head_and_base(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__} has no linear LM head (get_output_embeddings() returned "
                        f"{type(head).__name__}); lm_head_inputs takes a Hugging Face causal LM")
    base = getattr(model, "base_model", model)
    if base is model:
        raise TypeError(f"{type(model).__name__} has no base model under its LM head (base_model is the model itself)")
    return head, base


def _logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) applied to the head's output: logits = softcap(scale · (h·Wᵀ + b))."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(model, "logit_scale", None) is not None:  # Cohere
        scale *= float(model.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite, MiniCPM3
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)


def _run(model, input_ids, attention_mask, model_kwargs) -> LMHeadInputs:
    head, base = _head_and_base(model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    scale, softcap = _logit_transform(model)
    bias = head.bias
    if scale != 1.0:  # scale·(h·Wᵀ + b) = (scale·h)·Wᵀ + scale·b: an [N, H] product, not [N, V]
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return LMHeadInputs(hidden, head.weight, bias, softcap)


def verify_lm_head(model, input_ids, attention_mask=None, **model_kwargs) -> None:
    """Raises ValueError unless ``model(...).logits`` equals the logits of
    ``lm_head_inputs(model, ...)`` on the first sequence (its first VERIFY_TOKENS tokens),
    in eval mode (no dropout); the modules' train/eval flags are restored."""
    _head_and_base(model)  # a clear error first, if this is no causal LM
    ids = input_ids[:1, :VERIFY_TOKENS]
    mask = None if attention_mask is None else attention_mask[:1, :VERIFY_TOKENS]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False, **model_kwargs).logits
            actual = _run(model, ids, mask, model_kwargs).logits()
    finally:
        for m, training in flags:
            m.training = training
    if expected.shape != actual.shape:
        raise ValueError(f"{type(model).__name__}: model logits have shape {tuple(expected.shape)}, the LM head's "
                         f"{tuple(actual.shape)}; lm_head_inputs does not know this model")
    # A scale is applied before the matmul here and after it in the model: equal up to
    # rounding. NaN (e.g. a row whose attention sees no token) must sit in the same places.
    eps = torch.finfo(actual.dtype).eps
    expected, actual = expected.float(), actual.float()
    finite = expected.isfinite() & actual.isfinite()
    err = (expected - actual)[finite].abs().amax().item() if bool(finite.any()) else 0.0
    bound = 16 * eps * max([1.0] + ([expected[finite].abs().amax().item()] if bool(finite.any()) else []))
    if not (torch.equal(expected.isnan(), actual.isnan()) and err <= bound):
        raise ValueError(f"{type(model).__name__}: the logits from its last hidden state and LM head differ from "
                         f"model(...).logits by {err:.3g} (> {bound:.3g}): the model transforms its logits in a way "
                         f"lm_head_inputs does not know; use the model's logits and the row losses instead")


def lm_head_inputs(model, input_ids, attention_mask=None, *, verify: bool = True, **model_kwargs) -> LMHeadInputs:
    """Runs ``model``'s base model on the batch and returns its LM head's inputs: hidden
    states [B, T, H] (unshifted: pair them with ``shift_labels(labels)``), the head's
    weight [V, H] and bias, and the softcap. Differentiable like ``model(...)``; call it
    under ``torch.no_grad()`` for a frozen teacher. ``verify``: check the model once (see
    verify_lm_head). Extra keyword arguments go to the base model (e.g. position_ids)."""
    if verify and model not in _VERIFIED:
        verify_lm_head(model, input_ids, attention_mask, **model_kwargs)
        _VERIFIED.add(model)
    return _run(model, input_ids, attention_mask, model_kwargs)
