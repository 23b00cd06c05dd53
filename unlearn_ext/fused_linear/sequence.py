"""The sequence losses of unlearn_ext.ops.sequence on an LM head's hidden states.

GA, GradDiff and the retain terms are means of row losses. NPO and SimNPO weight each
sequence by a function of its own log-likelihood ℓ_b, so a row's gradient is known only
once its whole sequence has been read. When every sequence fits in a chunk, chunks are
cut at sequence boundaries and one pass suffices: a chunk's token log-probs give ℓ_b of
its sequences, then their weights, then the gradient (three matmuls, like the eager
loss). A sequence longer than a chunk falls back to two passes: token log-probs first,
the gradient pass in the backward with the weights known (the chunk logits formed twice).

Arguments as unlearn_ext.fused_linear.losses (hidden, weight, bias, softcap, backend,
chunk_size) and unlearn_ext.ops.sequence (labels, seq_index, num_sequences, β, δ, …).
``hidden`` [B, T, H] with ``labels`` [B, T] holds one sequence per batch row; packed rows
[N, H] take ``seq_index`` [N]. The forget and retain batches share the head's ``weight``.
"""
from __future__ import annotations

import torch

from .. import reference
from ..ops._checks import check_finite, host_reads_are_free
from ..ops.sequence import _check_seq_index, check_ref_logprob, sum_per_sequence
from ._inputs import Rows
from ._plan import apply, prepare
from .losses import IGNORE_INDEX, fused_linear_cross_entropy, fused_linear_forward_kl, fused_linear_token_logprob


def fused_linear_sequence_logprob(hidden, weight, labels, seq_index=None, num_sequences=None, *, bias=None,
                                  softcap=None, ignore_index=IGNORE_INDEX, temperature=1.0, backend=None,
                                  chunk_size=None):
    """(ℓ_b, |y_b|) per sequence: sums of answer-token log-probs and answer lengths (e.g.
    ℓ^ref of NPO from the frozen model's head under ``torch.no_grad()``)."""
    tokens = fused_linear_token_logprob(hidden, weight, labels, bias=bias, softcap=softcap, ignore_index=ignore_index,
                                        temperature=temperature, backend=backend, chunk_size=chunk_size)
    return sum_per_sequence(tokens, labels, seq_index, num_sequences, ignore_index=ignore_index)


class _SequenceChunks:
    """Reads rows sequence by sequence, in chunks of whole sequences when they fit (the
    ``arrange`` of a plan), and is then the objective: the mean over the sequences with
    answer tokens of per_sequence(ℓ_b, |y_b|, b), with each chunk's upstream gradient from
    its own rows.

    On eager CPU tensors the sequences' lengths are read on the host (free), only answer
    rows are read, and packed sequences are sorted when out of order. Elsewhere (GPUs,
    torch.compile) nothing is read on the host: [B, T, H] input reads every row, B
    sequences of T rows (ignored rows give 0); packed rows take the two-pass path."""

    def __init__(self, hidden, labels, seq_index, num_sequences, per_sequence, ignore_index,
                 check_num_sequences=None):
        self.hidden, self.labels, self.seq_index, self.num_sequences = hidden, labels, seq_index, num_sequences
        self.per_sequence, self.check_num_sequences = per_sequence, check_num_sequences
        self.ignore_index = ignore_index
        self.aligned = False

    def _sequences(self):
        """The sequence of each flat row, whether rows are packed, the number of sequences
        (called once prepare has checked hidden and labels)."""
        if self.seq_index is None:
            if self.hidden.dim() != 3:
                raise ValueError("seq_index is required unless hidden is [B, T, H] (one sequence per batch row)")
            batch, steps = self.hidden.shape[:2]
            return torch.arange(batch * steps, device=self.hidden.device) // max(steps, 1), False, batch
        seq, count = _check_seq_index(self.seq_index, self.labels, self.num_sequences)
        return seq, True, count

    def arrange(self, index, count, chunk):
        seq_of_row, packed, num_sequences = self._sequences()
        if self.check_num_sequences is not None:
            self.check_num_sequences(num_sequences)
        if not host_reads_are_free(self.hidden):
            return self._arrange_on_device(index, count, chunk, packed)
        rows = index if index is not None else torch.arange(count, device=seq_of_row.device)
        seq = seq_of_row[rows]
        if packed and count > 1 and not bool((seq[1:] >= seq[:-1]).all()):
            order = torch.sort(seq, stable=True).indices
            rows, seq, index = rows[order], seq[order], rows[order]
        self.ids, self.position, self.lengths = torch.unique_consecutive(seq, return_inverse=True, return_counts=True)
        self.used = self.ids.numel()
        sizes = self.lengths.tolist()
        if max(sizes, default=0) > chunk:  # a sequence longer than a chunk: two passes
            return index, Rows.even_bounds(count, chunk)
        return index, self._align(sizes, chunk)

    def _arrange_on_device(self, index, count, chunk, packed):
        """Every row in order (index is None here): B sequences of T rows, sizes known from
        the shape; their answer lengths stay on the device."""
        if packed or self.hidden.shape[1] > chunk:
            return index, Rows.even_bounds(count, chunk)
        batch, steps = self.hidden.shape[:2]
        self.ids = torch.arange(batch, device=self.hidden.device)
        self.position = torch.arange(batch * steps, device=self.hidden.device) // max(steps, 1)
        self.lengths = (self.labels != self.ignore_index).reshape(batch, steps).sum(-1)
        self.used = (self.lengths > 0).sum().clamp(min=1)
        return index, self._align([steps] * batch, chunk)

    def _align(self, sizes, chunk):
        """Chunk bounds at sequence boundaries, and each chunk's first and last sequence."""
        self.aligned = True
        bounds, self.chunk_sequences, start, first, size = [], {}, 0, 0, 0
        for j, n in enumerate(sizes + [chunk + 1]):  # the sentinel closes the last chunk
            if size + n > chunk and size > 0:
                bounds.append((start, start + size))
                self.chunk_sequences[start] = (first, j)
                start, first, size = start + size, j, 0
            size += n
        return bounds

    def _loss(self, logprob, first, last):
        """The share of sequences first:last in the mean over sequences with answer tokens."""
        ids, lengths = self.ids[first:last], self.lengths[first:last]
        per_seq = self.per_sequence(logprob, lengths.clamp(min=1).to(logprob.dtype), ids)
        return torch.where(lengths > 0, per_seq, torch.zeros_like(per_seq)).sum() / max_one(self.used)

    def __call__(self, values):
        logprob = values.new_zeros(self.ids.numel()).index_add_(0, self.position, values)
        return self._loss(logprob, 0, self.ids.numel())

    def upstream(self, values, start, stop):
        first, last = self.chunk_sequences[start]
        local = self.position[start:stop] - first
        logprob = values.new_zeros(last - first).index_add_(0, local, values.detach())
        # torch.func.grad, not torch.autograd.grad: torch.compile traces it.
        return torch.func.grad(lambda lp: self._loss(lp, first, last))(logprob)[local]


def max_one(n):
    return n if isinstance(n, torch.Tensor) else max(n, 1)


def _sequence_mean(hidden, weight, labels, seq_index, num_sequences, per_sequence, *, bias, softcap, ignore_index,
                   backend, chunk_size, check_num_sequences=None):
    """Mean over sequences with answer tokens of per_sequence(ℓ_b, |y_b|, b)."""
    chunks = _SequenceChunks(hidden, labels, seq_index, num_sequences, per_sequence, ignore_index,
                             check_num_sequences)
    student, plan = prepare(
        "token_logprob", (hidden, weight, bias, softcap), (), labels, labels_required=True,
        reference_fn=lambda x, y: reference.token_logprob(x, y, ignore_index=ignore_index),
        ignore_index=ignore_index, temperature=1.0, backend=backend, chunk_size=chunk_size, arrange=chunks.arrange)
    if chunks.aligned:
        return apply(student, plan, chunks)
    tokens = apply(student, plan, None)  # per-row log-probs; the gradient pass runs in the backward
    logprob, counts = sum_per_sequence(tokens, labels, seq_index, num_sequences, ignore_index=ignore_index)
    ids = torch.arange(logprob.numel(), device=logprob.device)
    return reference.mean_over_sequences(per_sequence(logprob, counts, ids), counts)


def fused_linear_npo(hidden, weight, labels, ref_logprob, seq_index=None, num_sequences=None, *, beta=0.1,
                     bias=None, softcap=None, ignore_index=IGNORE_INDEX, backend=None, chunk_size=None):
    """NPO: (2/β)·softplus(β(ℓ_b − ℓ_b^ref)), mean over sequences; ``ref_logprob`` [B]
    from the frozen model (fused_linear_sequence_logprob under ``torch.no_grad()``)."""
    beta = check_finite("beta", beta, positive=True)
    return _sequence_mean(
        hidden, weight, labels, seq_index, num_sequences,
        lambda logprob, counts, ids: reference.npo_per_sequence(logprob, ref_logprob[ids], beta),
        bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
        check_num_sequences=lambda b: check_ref_logprob(ref_logprob, (b,), hidden.device))


def fused_linear_simnpo(hidden, weight, labels, seq_index=None, num_sequences=None, *, beta=2.5, delta=0.0,
                        bias=None, softcap=None, ignore_index=IGNORE_INDEX, backend=None, chunk_size=None):
    """SimNPO: (2/β)·softplus(−β(NLL_b/|y_b| − δ)), mean over sequences, no reference model."""
    beta = check_finite("beta", beta, positive=True)
    delta = check_finite("delta", delta)
    return _sequence_mean(
        hidden, weight, labels, seq_index, num_sequences,
        lambda logprob, counts, ids: reference.simnpo_per_sequence(logprob, counts, beta, delta),
        bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size)


def fused_linear_ga(hidden, weight, labels, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX, backend=None,
                    chunk_size=None):
    """Gradient ascent: −NLL on forget answers, mean over answer tokens."""
    return -fused_linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap, ignore_index=ignore_index,
                                       backend=backend, chunk_size=chunk_size)


def fused_linear_retain(hidden, weight, labels, ref=None, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                        backend=None, chunk_size=None):
    """NLL on retain answers, or forward KL(π_ref ‖ π_θ) over them when ``ref`` (the frozen
    model's LMHeadInputs on the retain batch) is given."""
    kw = dict(bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size)
    if ref is None:
        return fused_linear_cross_entropy(hidden, weight, labels, **kw)
    return fused_linear_forward_kl(hidden, weight, ref, labels, **kw)


def fused_linear_graddiff(forget_hidden, weight, forget_labels, retain_hidden, retain_labels, *, forget_weight=1.0,
                          retain_weight=1.0, retain_ref=None, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                          backend=None, chunk_size=None):
    """−w_f·NLL_forget + w_r·NLL_retain (or + w_r·KL(π_ref ‖ π_θ) with ``retain_ref``)."""
    forget_weight = check_finite("forget_weight", forget_weight)
    retain_weight = check_finite("retain_weight", retain_weight)
    kw = dict(bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size)
    forget = fused_linear_cross_entropy(forget_hidden, weight, forget_labels, **kw)
    return -forget_weight * forget + retain_weight * fused_linear_retain(retain_hidden, weight, retain_labels,
                                                                         retain_ref, **kw)


def fused_linear_npo_rt(forget_hidden, weight, forget_labels, ref_logprob, retain_hidden, retain_labels,
                        seq_index=None, num_sequences=None, *, beta=0.1, retain_weight=1.0, bias=None, softcap=None,
                        ignore_index=IGNORE_INDEX, backend=None, chunk_size=None):
    """NPO+RT: NPO on the forget batch plus w_r·NLL on the retain batch."""
    retain_weight = check_finite("retain_weight", retain_weight)
    kw = dict(bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size)
    return (fused_linear_npo(forget_hidden, weight, forget_labels, ref_logprob, seq_index, num_sequences, beta=beta,
                             **kw)
            + retain_weight * fused_linear_retain(retain_hidden, weight, retain_labels, **kw))


def fused_linear_npo_kl(forget_hidden, weight, forget_labels, ref_logprob, retain_hidden, retain_labels, retain_ref,
                        seq_index=None, num_sequences=None, *, beta=0.1, retain_weight=1.0, bias=None, softcap=None,
                        ignore_index=IGNORE_INDEX, backend=None, chunk_size=None):
    """NPO+KL: NPO on the forget batch plus w_r·KL(π_ref ‖ π_θ) on the retain batch."""
    retain_weight = check_finite("retain_weight", retain_weight)
    kw = dict(bias=bias, softcap=softcap, ignore_index=ignore_index, backend=backend, chunk_size=chunk_size)
    return (fused_linear_npo(forget_hidden, weight, forget_labels, ref_logprob, seq_index, num_sequences, beta=beta,
                             **kw)
            + retain_weight * fused_linear_retain(retain_hidden, weight, retain_labels, retain_ref, **kw))
