"""Fused-linear sequence losses (GA, GradDiff, NPO and variants, SimNPO) against the
unlearn_ext.ops.sequence losses on materialised float64 logits, values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unlearn_ext as ue
from unlearn_ext.fused_linear import _chunked

from conftest import backend_params

IGNORE = -100
BACKENDS = backend_params()
B, T, H, V = 5, 9, 8, 53
PROMPT = 3  # ignored tokens at the start of each sequence: 6 answer tokens per sequence


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(True)


def batch(device, *, empty_sequence=True):
    hidden, weight, bias = leaf(B, T, H), leaf(V, H), leaf(V)
    labels = torch.randint(0, V, (B, T))
    labels[:, :PROMPT] = IGNORE
    if empty_sequence:
        labels[2] = IGNORE  # a sequence without answer tokens is left out of the means
    return [x.detach().to(device).requires_grad_(True) for x in (hidden, weight, bias)], labels.to(device)


def value_and_grads(fn, leaves):
    for x in leaves:
        x.grad = None
    out = fn()
    out.backward()
    return [out.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad.clone() for x in leaves]


def assert_same(got, expected, where):
    for what, g, e in zip(("value", "d_hidden", "d_weight", "d_bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{where} {what}: {m}")


def count_chunks(monkeypatch):
    """Counts the chunk logits the loop forms (one pass: one per chunk; two passes: two)."""
    calls = []
    real = _chunked._logits
    monkeypatch.setattr(_chunked, "_logits", lambda h, w, b: calls.append(h.shape[0]) or real(h, w, b))
    return calls


# chunk sizes: 6 = one sequence per chunk, 13 = two, 100 = all (one pass);
# 4 = shorter than a sequence: two passes
CHUNKS = [(6, 1), (13, 1), (100, 1), (4, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk,passes", CHUNKS, ids=[f"chunk{c}" for c, _ in CHUNKS])
@pytest.mark.parametrize("loss", ["npo", "simnpo"])
def test_npo_simnpo_match_ops(backend, chunk, passes, loss, monkeypatch, seed):
    name, device = backend
    (hidden, weight, bias), labels = batch(device)
    ref_logprob = (torch.randn(B, dtype=torch.float64) * 3 - 20).to(device)
    if loss == "npo":
        fused = lambda: ue.fused_linear_npo(hidden, weight, labels, ref_logprob, beta=0.3, bias=bias,  # noqa: E731
                                            backend=name, chunk_size=chunk)
        eager = lambda: ue.npo_loss(F.linear(hidden, weight, bias), labels, ref_logprob, beta=0.3,  # noqa: E731
                                    backend="torch")
    else:
        fused = lambda: ue.fused_linear_simnpo(hidden, weight, labels, beta=3.0, delta=0.2, bias=bias,  # noqa: E731
                                               backend=name, chunk_size=chunk)
        eager = lambda: ue.simnpo_loss(F.linear(hidden, weight, bias), labels, beta=3.0, delta=0.2,  # noqa: E731
                                       backend="torch")
    calls = count_chunks(monkeypatch)
    got = value_and_grads(fused, [hidden, weight, bias])
    counted = int((labels != IGNORE).sum())
    assert sum(calls) == passes * counted, f"expected {passes} pass(es) over the {counted} answer rows, got {calls}"
    assert max(calls) <= chunk
    assert_same(got, value_and_grads(eager, [hidden, weight, bias]), f"{loss} {name} chunk={chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [7, 4])
def test_packed_sequences_in_any_order(backend, chunk, seed):
    """Packed rows [N, H] with a shuffled seq_index: rows are read sequence by sequence."""
    name, device = backend
    (hidden, weight, bias), labels = batch(device)
    perm = torch.randperm(B * T, device=device)
    seq = (torch.arange(B * T, device=device) // T)[perm]
    ref_logprob = (torch.randn(B, dtype=torch.float64) * 3 - 20).to(device)

    def packed(x):
        return x.reshape(B * T, *x.shape[2:])[perm]

    got = value_and_grads(lambda: ue.fused_linear_npo(packed(hidden), weight, packed(labels), ref_logprob, seq, B,
                                                      bias=bias, backend=name, chunk_size=chunk),
                          [hidden, weight, bias])
    expected = value_and_grads(lambda: ue.npo_loss(packed(F.linear(hidden, weight, bias)), packed(labels),
                                                   ref_logprob, seq, B, backend="torch"), [hidden, weight, bias])
    assert_same(got, expected, f"packed npo {name} chunk={chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprob(backend, seed):
    name, device = backend
    (hidden, weight, bias), labels = batch(device)
    upstream = torch.randn(B, dtype=torch.float64, device=device)

    def weighted(fn):
        def call():
            logprob, counts = fn()
            return (logprob * upstream).sum() + counts.sum()
        return call

    got = value_and_grads(weighted(lambda: ue.fused_linear_sequence_logprob(hidden, weight, labels, bias=bias,
                                                                            backend=name, chunk_size=5)),
                          [hidden, weight, bias])
    expected = value_and_grads(weighted(lambda: ue.sequence_logprob(F.linear(hidden, weight, bias), labels,
                                                                    backend="torch")), [hidden, weight, bias])
    assert_same(got, expected, f"sequence_logprob {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["ga", "graddiff", "graddiff_kl", "npo_rt", "npo_kl"])
def test_composite_losses_match_ops(backend, loss, seed):
    """Forget and retain batches through one head (shared weight); the KL terms read a
    frozen reference head whose hidden states get no gradient."""
    name, device = backend
    (forget, weight, bias), forget_labels = batch(device)
    (retain, _, _), retain_labels = batch(device, empty_sequence=False)
    ref_hidden, ref_weight = leaf(B, T, 6).to(device), leaf(V, 6).to(device)
    ref_head = ue.LMHeadInputs(ref_hidden, ref_weight)
    ref_logits = (ref_hidden @ ref_weight.T).detach()
    ref_logprob = (torch.randn(B, dtype=torch.float64) * 3 - 20).to(device)
    kw = dict(bias=bias, backend=name, chunk_size=8)
    logits = lambda x: F.linear(x, weight, bias)  # noqa: E731
    fused, eager = {
        "ga": (lambda: ue.fused_linear_ga(forget, weight, forget_labels, **kw),
               lambda: ue.ga_loss(logits(forget), forget_labels, backend="torch")),
        "graddiff": (lambda: ue.fused_linear_graddiff(forget, weight, forget_labels, retain, retain_labels,
                                                      forget_weight=0.7, retain_weight=1.3, **kw),
                     lambda: ue.graddiff_loss(logits(forget), forget_labels, logits(retain), retain_labels,
                                              forget_weight=0.7, retain_weight=1.3, backend="torch")),
        "graddiff_kl": (lambda: ue.fused_linear_graddiff(forget, weight, forget_labels, retain, retain_labels,
                                                         retain_ref=ref_head, **kw),
                        lambda: ue.graddiff_loss(logits(forget), forget_labels, logits(retain), retain_labels,
                                                 retain_ref_logits=ref_logits, backend="torch")),
        "npo_rt": (lambda: ue.fused_linear_npo_rt(forget, weight, forget_labels, ref_logprob, retain, retain_labels,
                                                  retain_weight=0.5, **kw),
                   lambda: ue.npo_rt_loss(logits(forget), forget_labels, ref_logprob, logits(retain), retain_labels,
                                          retain_weight=0.5, backend="torch")),
        "npo_kl": (lambda: ue.fused_linear_npo_kl(forget, weight, forget_labels, ref_logprob, retain, retain_labels,
                                                  ref_head, **kw),
                   lambda: ue.npo_kl_loss(logits(forget), forget_labels, ref_logprob, logits(retain), retain_labels,
                                          ref_logits, backend="torch")),
    }[loss]
    leaves = [forget, retain, weight, bias]
    got, expected = value_and_grads(fused, leaves), value_and_grads(eager, leaves)
    for what, g, e in zip(("value", "d_forget", "d_retain", "d_weight", "d_bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{loss} {name} {what}: {m}")
    assert ref_hidden.grad is None and ref_weight.grad is None


def test_no_answer_tokens_gives_zero(seed):
    (hidden, weight, _), labels = batch("cpu")
    labels[:] = IGNORE
    for fn in (lambda: ue.fused_linear_npo(hidden, weight, labels, torch.zeros(B, dtype=torch.float64)),
               lambda: ue.fused_linear_simnpo(hidden, weight, labels)):
        out = fn()
        out.backward()
        assert out.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_bad_sequence_inputs():
    (hidden, weight, _), labels = batch("cpu")
    with pytest.raises(ValueError, match="ref_logprob"):
        ue.fused_linear_npo(hidden, weight, labels, torch.zeros(B + 1))
    with pytest.raises(ValueError, match="seq_index"):
        ue.fused_linear_simnpo(hidden.reshape(B * T, H), weight, labels.reshape(-1))
    with pytest.raises(ValueError, match="seq_index"):
        ue.fused_linear_simnpo(hidden.reshape(B * T, H), weight, labels.reshape(-1),
                               torch.full((B * T,), B), num_sequences=B)
    with pytest.raises(ValueError, match="labels"):
        ue.fused_linear_npo(hidden, weight, None, torch.zeros(B))
