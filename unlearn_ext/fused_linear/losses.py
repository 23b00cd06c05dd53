"""The row ops of unlearn_ext.ops on an LM head's hidden states: same values, same
gradients, without the [N, V] logits.

    head = unlearn_ext.models.lm_head_inputs(model, input_ids, attention_mask)
    labels = unlearn_ext.shift_labels(batch["labels"])          # unshifted hidden, no copy
    loss = ue.fused_linear_cross_entropy(head.hidden, head.weight, labels,
                                         bias=head.bias, softcap=head.softcap)
    with torch.no_grad():
        ref = unlearn_ext.models.lm_head_inputs(frozen_model, input_ids, attention_mask)
    kl = ue.fused_linear_forward_kl(head.hidden, head.weight, ref, labels)

Common arguments:
    hidden: [N, H] or [B, T, H] (any leading shape, strided views such as ``hidden[:, :-1]``
        read in place), float32 / bfloat16 / float16 / float64.
    weight: [V, H] LM-head weight, dtype of ``hidden``; ``bias`` [V] optional.
    softcap: c for Gemma-2-style logits c·tanh(z / c), or None.
    teacher / original / augmented: an :class:`LMHeadInputs` (or a ``(hidden, weight)``
        tuple) with the rows and vocabulary of the student; it never receives a gradient,
        and may share its weight tensor with the student (tied embeddings).
    labels: leading shape of ``hidden``; rows with ``ignore_index`` count nothing and cost
        nothing (they are skipped). Causal shifting is the caller's (see shift_labels).
    reduction, temperature, ignore_index, alpha, gamma, beta, label_smoothing,
        lse_square_scale: as the row ops (the z-loss is part of the loss; return_z_loss is
        the row op's only).
    backend: the row kernels' backend (``torch``, ``cpu``, ``cuda``, ``triton``).
    chunk_size: rows per chunk; default from V, H and the device (see default_chunk_rows).
Under autocast, the head is applied in autocast's dtype, as F.linear would be.
"""
from __future__ import annotations

import torch

from .. import reference
from ..ops._checks import check_finite, check_fraction
from ._plan import row_loss

IGNORE_INDEX = reference.IGNORE_INDEX


def fused_linear_token_logprob(hidden, weight, labels, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                               reduction="none", temperature=1.0, backend=None, chunk_size=None) -> torch.Tensor:
    """log softmax(logits / τ)[label] per row (0 on ignored rows); see :func:`unlearn_ext.token_logprob`."""
    return row_loss(
        "token_logprob", hidden, weight, (), labels, bias=bias, softcap=softcap, labels_required=True,
        reference_fn=lambda x, y: reference.token_logprob(x, y, ignore_index=ignore_index, temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size)


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                               reduction="mean", temperature=1.0, label_smoothing=0.0, lse_square_scale=0.0,
                               backend=None, chunk_size=None) -> torch.Tensor:
    """Cross entropy of each row against its label, with PyTorch's label smoothing and
    Liger's z-loss; see :func:`unlearn_ext.cross_entropy`."""
    eps = check_fraction("label_smoothing", label_smoothing)
    z = check_finite("lse_square_scale", lse_square_scale, nonnegative=True)
    return row_loss(
        "cross_entropy", hidden, weight, (), labels, bias=bias, softcap=softcap, labels_required=True,
        reference_fn=lambda x, y: reference.cross_entropy(x, y, ignore_index=ignore_index, temperature=temperature,
                                                          label_smoothing=eps, lse_square_scale=z),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size, label_smoothing=eps, lse_square_scale=z)


def fused_linear_forward_kl(hidden, weight, teacher, labels=None, *, bias=None, softcap=None,
                            ignore_index=IGNORE_INDEX, reduction="mean", temperature=1.0, backend=None,
                            chunk_size=None) -> torch.Tensor:
    """KL(teacher ‖ student) per row; see :func:`unlearn_ext.forward_kl`."""
    return row_loss(
        "forward_kl", hidden, weight, (("teacher", teacher),), labels, bias=bias, softcap=softcap,
        labels_required=False,
        reference_fn=lambda x, t, y: reference.forward_kl(x, t, y, ignore_index=ignore_index, temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size)


def fused_linear_reverse_kl(hidden, weight, teacher, labels=None, *, bias=None, softcap=None,
                            ignore_index=IGNORE_INDEX, reduction="mean", temperature=1.0, backend=None,
                            chunk_size=None) -> torch.Tensor:
    """KL(student ‖ teacher) per row; see :func:`unlearn_ext.reverse_kl`."""
    return row_loss(
        "reverse_kl", hidden, weight, (("teacher", teacher),), labels, bias=bias, softcap=softcap,
        labels_required=False,
        reference_fn=lambda x, t, y: reference.reverse_kl(x, t, y, ignore_index=ignore_index, temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size)


def fused_linear_rkld(hidden, weight, original, augmented, labels=None, *, alpha=8.0, bias=None, softcap=None,
                      ignore_index=IGNORE_INDEX, reduction="mean", temperature=1.0, backend=None,
                      chunk_size=None) -> torch.Tensor:
    """Reverse KL to the RKLD teacher o − α·relu(a − o) built from the original and the
    augmented model's heads, chunk by chunk; see :func:`unlearn_ext.rkld`."""
    alpha = check_finite("alpha", alpha, nonnegative=True)
    return row_loss(
        "rkld", hidden, weight, (("original", original), ("augmented", augmented)), labels, bias=bias,
        softcap=softcap, labels_required=False,
        reference_fn=lambda x, o, a, y: reference.rkld(x, o, a, y, alpha=alpha, ignore_index=ignore_index,
                                                       temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size, alpha=alpha)


def fused_linear_undial(hidden, weight, teacher, labels, *, gamma=10.0, bias=None, softcap=None,
                        ignore_index=IGNORE_INDEX, reduction="mean", temperature=1.0, backend=None,
                        chunk_size=None) -> torch.Tensor:
    """Soft-label CE to the γ-adjusted teacher; see :func:`unlearn_ext.undial`."""
    gamma = check_finite("gamma", gamma)
    return row_loss(
        "undial", hidden, weight, (("teacher", teacher),), labels, bias=bias, softcap=softcap, labels_required=True,
        reference_fn=lambda x, t, y: reference.undial(x, t, y, gamma=gamma, ignore_index=ignore_index,
                                                      temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size, gamma=gamma)


def fused_linear_jsd(hidden, weight, teacher, labels=None, *, beta=0.5, bias=None, softcap=None,
                     ignore_index=IGNORE_INDEX, reduction="mean", temperature=1.0, backend=None,
                     chunk_size=None) -> torch.Tensor:
    """The generalised JSD scaled to be continuous in β (β = 0 forward KL, β = 1 reverse
    KL); see :func:`unlearn_ext.jsd`."""
    beta = check_fraction("beta", beta)
    kw = dict(bias=bias, softcap=softcap, ignore_index=ignore_index, reduction=reduction, temperature=temperature,
              backend=backend, chunk_size=chunk_size)
    if beta == 0.0:
        return fused_linear_forward_kl(hidden, weight, teacher, labels, **kw)
    if beta == 1.0:
        return fused_linear_reverse_kl(hidden, weight, teacher, labels, **kw)
    return row_loss(
        "jsd", hidden, weight, (("teacher", teacher),), labels, bias=bias, softcap=softcap, labels_required=False,
        reference_fn=lambda x, t, y: reference.jsd(x, t, y, beta=beta, ignore_index=ignore_index,
                                                   temperature=temperature),
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        chunk_size=chunk_size, beta=beta)
