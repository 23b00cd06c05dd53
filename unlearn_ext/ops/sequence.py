"""Sequence-level unlearning losses on top of token_logprob (DESIGN.md, "Sequence losses").

The [N, V] work stays in the row kernels; what is left is small ops on [N] and [B]
tensors: segment sums by a sequence index and the per-sequence formulas. NPO and SimNPO
weight each sequence differently, so they rely on token_logprob's exact per-row gradient.

ℓ_b below is the sum of token log-probs over the answer tokens of sequence b (labels not
equal to ``ignore_index``); |y_b| is their number. Causal-LM shifting is the caller's:
pass ``logits[:, :-1]`` with ``labels[:, 1:]`` (read in place, no copy).
Sequences without answer tokens are left out of the means over sequences.
"""
from __future__ import annotations

import torch

from .. import reference
from ._checks import check_finite
from .cross_entropy import cross_entropy
from .forward_kl import forward_kl
from .token_logprob import token_logprob

IGNORE_INDEX = reference.IGNORE_INDEX


def _check_seq_index(seq_index, labels, num_sequences):
    if not isinstance(seq_index, torch.Tensor) or seq_index.dtype.is_floating_point or seq_index.dtype == torch.bool:
        raise TypeError("seq_index must be an integer tensor")
    if seq_index.shape != labels.shape:
        raise ValueError(f"seq_index must have the shape of labels {tuple(labels.shape)}, got {tuple(seq_index.shape)}")
    if seq_index.device != labels.device:
        raise ValueError(f"seq_index is on {seq_index.device} but labels are on {labels.device}")
    flat = seq_index.reshape(-1).to(torch.int64)
    if num_sequences is not None and (isinstance(num_sequences, bool) or not isinstance(num_sequences, int)
                                      or num_sequences < 0):
        raise ValueError(f"num_sequences must be a non-negative int, got {num_sequences!r}")
    if num_sequences is None:  # a host synchronisation on GPUs: pass num_sequences there
        num_sequences = int(flat.max()) + 1 if flat.numel() else 0
    elif flat.numel():
        outside = ((flat < 0) | (flat >= num_sequences)).any()
        if flat.device.type != "cpu":  # no host sync on GPUs: a device-side assert
            torch._assert_async(~outside, f"unlearn_ext: seq_index must lie in [0, num_sequences={num_sequences})")
        elif not torch.compiler.is_compiling() and bool(outside):
            raise ValueError(f"seq_index must lie in [0, num_sequences={num_sequences})")
    return flat, num_sequences


def sequence_logprob(logits, labels, seq_index=None, num_sequences=None, *, ignore_index=IGNORE_INDEX,
                     temperature=1.0, backend=None):
    """(ℓ_b, |y_b|) per sequence: sums of answer-token log-probs and answer lengths.

    ``logits`` [B, T, V] with ``labels`` [B, T]: one sequence per batch row. Packed rows:
    ``logits`` [N, V], ``labels`` [N] and ``seq_index`` [N] in [0, num_sequences)
    (``num_sequences`` saves a host synchronisation on the GPU).
    """
    tokens = token_logprob(logits, labels, ignore_index=ignore_index, temperature=temperature, backend=backend)
    return sum_per_sequence(tokens, labels, seq_index, num_sequences, ignore_index=ignore_index)


def sum_per_sequence(tokens, labels, seq_index=None, num_sequences=None, *, ignore_index=IGNORE_INDEX):
    """(ℓ_b, |y_b|) from per-token log-probs: [B, T] (one sequence per batch row), or packed
    [N] with ``seq_index`` (see sequence_logprob)."""
    counted = (labels != ignore_index).to(tokens.dtype)
    if seq_index is None:
        if tokens.dim() != 2:
            raise ValueError("seq_index is required unless the batch is [B, T] (one sequence per batch row)")
        return tokens.sum(-1), counted.sum(-1)
    index, b = _check_seq_index(seq_index, labels, num_sequences)
    zeros = tokens.new_zeros(b)
    return zeros.index_add(0, index, tokens.reshape(-1)), zeros.index_add(0, index, counted.reshape(-1))


def check_ref_logprob(ref_logprob, shape, device) -> None:
    if not isinstance(ref_logprob, torch.Tensor) or ref_logprob.shape != shape:
        raise ValueError(f"ref_logprob must be a tensor of shape {tuple(shape)} (one value per sequence)")
    if ref_logprob.device != device:
        raise ValueError(f"ref_logprob is on {ref_logprob.device} but logits are on {device}")


def ga_loss(logits, labels, *, ignore_index=IGNORE_INDEX, backend=None):
    """Gradient ascent: −NLL on forget answers, mean over answer tokens."""
    return -cross_entropy(logits, labels, ignore_index=ignore_index, backend=backend)


def retain_loss(logits, labels, ref_logits=None, *, ignore_index=IGNORE_INDEX, backend=None):
    """NLL on retain answers, or forward KL(π_ref ‖ π_θ) over them when ``ref_logits`` is given."""
    if ref_logits is None:
        return cross_entropy(logits, labels, ignore_index=ignore_index, backend=backend)
    return forward_kl(logits, ref_logits, labels, ignore_index=ignore_index, backend=backend)


def graddiff_loss(forget_logits, forget_labels, retain_logits, retain_labels, *, forget_weight=1.0,
                  retain_weight=1.0, retain_ref_logits=None, ignore_index=IGNORE_INDEX, backend=None):
    """−w_f·NLL_forget + w_r·NLL_retain (or + w_r·KL(π_ref ‖ π_θ) with ``retain_ref_logits``)."""
    forget_weight = check_finite("forget_weight", forget_weight)
    retain_weight = check_finite("retain_weight", retain_weight)
    forget = cross_entropy(forget_logits, forget_labels, ignore_index=ignore_index, backend=backend)
    retain = retain_loss(retain_logits, retain_labels, retain_ref_logits, ignore_index=ignore_index,
                         backend=backend)
    return -forget_weight * forget + retain_weight * retain


def npo_loss(logits, labels, ref_logprob, seq_index=None, num_sequences=None, *, beta=0.1,
             ignore_index=IGNORE_INDEX, backend=None):
    """NPO (arXiv 2404.05868): (2/β)·softplus(β(ℓ_b − ℓ_b^ref)), mean over sequences.

    ``ref_logprob`` [B] holds ℓ_b^ref from the frozen starting model (e.g.
    ``sequence_logprob`` under ``torch.no_grad()``).
    """
    beta = check_finite("beta", beta, positive=True)
    logprob, counts = sequence_logprob(logits, labels, seq_index, num_sequences, ignore_index=ignore_index,
                                       backend=backend)
    check_ref_logprob(ref_logprob, logprob.shape, logprob.device)
    return reference.mean_over_sequences(reference.npo_per_sequence(logprob, ref_logprob, beta), counts)


def npo_rt_loss(forget_logits, forget_labels, ref_logprob, retain_logits, retain_labels, seq_index=None,
                num_sequences=None, *, beta=0.1, retain_weight=1.0, ignore_index=IGNORE_INDEX, backend=None):
    """NPO+RT: NPO on the forget batch plus w_r·NLL on the retain batch."""
    retain_weight = check_finite("retain_weight", retain_weight)
    return (npo_loss(forget_logits, forget_labels, ref_logprob, seq_index, num_sequences, beta=beta,
                     ignore_index=ignore_index, backend=backend)
            + retain_weight * retain_loss(retain_logits, retain_labels, ignore_index=ignore_index, backend=backend))


def npo_kl_loss(forget_logits, forget_labels, ref_logprob, retain_logits, retain_labels, retain_ref_logits,
                seq_index=None, num_sequences=None, *, beta=0.1, retain_weight=1.0, ignore_index=IGNORE_INDEX,
                backend=None):
    """NPO+KL: NPO on the forget batch plus w_r·KL(π_ref ‖ π_θ) on the retain batch."""
    retain_weight = check_finite("retain_weight", retain_weight)
    return (npo_loss(forget_logits, forget_labels, ref_logprob, seq_index, num_sequences, beta=beta,
                     ignore_index=ignore_index, backend=backend)
            + retain_weight * retain_loss(retain_logits, retain_labels, retain_ref_logits,
                                          ignore_index=ignore_index, backend=backend))


def simnpo_loss(logits, labels, seq_index=None, num_sequences=None, *, beta=2.5, delta=0.0,
                ignore_index=IGNORE_INDEX, backend=None):
    """SimNPO (arXiv 2410.07163): (2/β)·softplus(−β(NLL_b/|y_b| − δ)), no reference model,
    mean over sequences. β = 2.5 (forget05) to 4.5 (forget10), δ = 0 in the paper."""
    beta = check_finite("beta", beta, positive=True)
    delta = check_finite("delta", delta)
    logprob, counts = sequence_logprob(logits, labels, seq_index, num_sequences, ignore_index=ignore_index,
                                       backend=backend)
    return reference.mean_over_sequences(reference.simnpo_per_sequence(logprob, counts, beta, delta), counts)
