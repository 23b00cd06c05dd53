"""Fused-linear sequence losses (GA, GradDiff, NPO and variants, SimNPO) against the
unlearn_ext.ops.sequence losses on materialised float64 logits, values and gradients."""
from __future__ import annotations

import pytest
from reliability_tally import tally
import torch
import torch.nn.functional as F

import unlearn_ext as ue
from unlearn_ext.fused_linear import _chunked

from conftest import BACKEND_DEVICES
from test_fused_linear import BACKENDS, INTERPRETED, backend_id

IGNORE = -100
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
    out = fn(*leaves)
    out.backward()
    return [out.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad.clone() for x in leaves]


def compare(fused, eager, leaves, backend, where):
    """fused(*leaves) on the backend against eager(*leaves) (float64 logits, torch ops):
    float64 inputs where the kernels take them (torch, cpu), else float32 copies."""
    dtype = torch.float64 if backend[0] in ("torch", "cpu") else torch.float32
    mine = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
    got, expected = value_and_grads(fused, mine), value_and_grads(eager, leaves)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for k, (g, e) in enumerate(zip(got, expected)):
        what = "value" if k == 0 else f"gradient of input {k - 1}"
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * 1e-2, msg=lambda m: f"{where} {what}: {m}")


def count_chunks(monkeypatch):
    """Counts the chunk logits the loop forms (one pass: one per chunk; two passes: two)."""
    calls = []
    real = _chunked._logits
    monkeypatch.setattr(_chunked, "_logits", lambda h, w, b: calls.append(h.shape[0]) or real(h, w, b))
    return calls


# chunk sizes: 6 = one sequence per chunk, 13 = two, 100 = all (one pass);
# 4 = shorter than a sequence: two passes
CHUNKS = [(6, 1), (13, 1), (100, 1), (4, 2)]


# Triton's interpreter (see test_fused_linear): NPO in one pass only.
NPO_CASES = [pytest.param(backend, chunk, passes, loss, id=f"{backend_id(backend)}-chunk{chunk}-{loss}")
             for backend in BACKEND_DEVICES for chunk, passes in CHUNKS for loss in ("npo", "simnpo")
             if backend != INTERPRETED or (chunk == 13 and loss == "npo")]


@pytest.mark.parametrize("backend,chunk,passes,loss", NPO_CASES)
def test_npo_simnpo_match_ops(backend, chunk, passes, loss, monkeypatch, seed):
    name, device = backend
    leaves, labels = batch(device)
    ref_logprob = (torch.randn(B, dtype=torch.float64) * 3 - 20).to(device)
    if loss == "npo":
        def fused(h, w, b):
            return ue.fused_linear_npo(h, w, labels, ref_logprob, beta=0.3, bias=b, backend=name, chunk_size=chunk)

        def eager(h, w, b):
            return ue.npo_loss(F.linear(h, w, b), labels, ref_logprob, beta=0.3, backend="torch")
    else:
        def fused(h, w, b):
            return ue.fused_linear_simnpo(h, w, labels, beta=3.0, delta=0.2, bias=b, backend=name, chunk_size=chunk)

        def eager(h, w, b):
            return ue.simnpo_loss(F.linear(h, w, b), labels, beta=3.0, delta=0.2, backend="torch")
    calls = count_chunks(monkeypatch)
    compare(fused, eager, leaves, backend, f"{loss} {name} chunk={chunk}")
    counted = int((labels != IGNORE).sum())
    assert sum(calls) == passes * counted, f"{passes} pass(es) over the {counted} answer rows, got {calls}"
    assert max(calls) <= chunk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [7, 4])
def test_packed_sequences_in_any_order(backend, chunk, seed):
    """Packed rows [N, H] with a shuffled seq_index: rows are read sequence by sequence."""
    name, device = backend
    leaves, labels = batch(device)
    perm = torch.randperm(B * T, device=device)
    seq = (torch.arange(B * T, device=device) // T)[perm]
    ref_logprob = (torch.randn(B, dtype=torch.float64) * 3 - 20).to(device)

    def packed(x):
        return x.reshape(B * T, *x.shape[2:])[perm]

    compare(lambda h, w, b: ue.fused_linear_npo(packed(h), w, packed(labels), ref_logprob, seq, B, bias=b,
                                                backend=name, chunk_size=chunk),
            lambda h, w, b: ue.npo_loss(packed(F.linear(h, w, b)), packed(labels), ref_logprob, seq, B,
                                        backend="torch"),
            leaves, backend, f"packed npo {name} chunk={chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprob(backend, seed):
    name, device = backend
    leaves, labels = batch(device)
    upstream = torch.randn(B, dtype=torch.float64, device=device)

    def weighted(logprob_and_counts):
        logprob, counts = logprob_and_counts
        return (logprob * upstream.to(logprob.dtype)).sum() + counts.sum()

    compare(lambda h, w, b: weighted(ue.fused_linear_sequence_logprob(h, w, labels, bias=b, backend=name,
                                                                      chunk_size=5)),
            lambda h, w, b: weighted(ue.sequence_logprob(F.linear(h, w, b), labels, backend="torch")),
            leaves, backend, f"sequence_logprob {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["ga", "graddiff", "graddiff_kl", "npo_rt", "npo_kl"])
def test_composite_losses_match_ops(backend, loss, seed):
    """Forget and retain batches through one head (shared weight); the KL terms read a
    frozen reference head whose hidden states get no gradient."""
    name, device = backend
    (forget, weight, bias), forget_labels = batch(device)
    (retain, _, _), retain_labels = batch(device, empty_sequence=False)
    ref_hidden, ref_weight = leaf(B, T, 6).to(device), leaf(V, 6).to(device)
    ref_logits = (ref_hidden @ ref_weight.T).detach()
    ref_logprob = (torch.randn(B, dtype=torch.float64) * 3 - 20).to(device)

    def ref_head(like):
        return ue.LMHeadInputs(ref_hidden.to(like.dtype), ref_weight.to(like.dtype))

    def fused(f, r, w, b):
        kw = dict(bias=b, backend=name, chunk_size=8)
        if loss == "ga":
            return ue.fused_linear_ga(f, w, forget_labels, **kw)
        if loss == "graddiff":
            return ue.fused_linear_graddiff(f, w, forget_labels, r, retain_labels, forget_weight=0.7,
                                            retain_weight=1.3, **kw)
        if loss == "graddiff_kl":
            return ue.fused_linear_graddiff(f, w, forget_labels, r, retain_labels, retain_ref=ref_head(f), **kw)
        if loss == "npo_rt":
            return ue.fused_linear_npo_rt(f, w, forget_labels, ref_logprob, r, retain_labels, retain_weight=0.5,
                                          **kw)
        return ue.fused_linear_npo_kl(f, w, forget_labels, ref_logprob, r, retain_labels, ref_head(f), **kw)

    def eager(f, r, w, b):
        fl, rl = F.linear(f, w, b), F.linear(r, w, b)
        if loss == "ga":
            return ue.ga_loss(fl, forget_labels, backend="torch")
        if loss == "graddiff":
            return ue.graddiff_loss(fl, forget_labels, rl, retain_labels, forget_weight=0.7, retain_weight=1.3,
                                    backend="torch")
        if loss == "graddiff_kl":
            return ue.graddiff_loss(fl, forget_labels, rl, retain_labels, retain_ref_logits=ref_logits,
                                    backend="torch")
        if loss == "npo_rt":
            return ue.npo_rt_loss(fl, forget_labels, ref_logprob, rl, retain_labels, retain_weight=0.5,
                                  backend="torch")
        return ue.npo_kl_loss(fl, forget_labels, ref_logprob, rl, retain_labels, ref_logits, backend="torch")

    compare(fused, eager, [forget, retain, weight, bias], backend, f"{loss} {name}")
    assert ref_hidden.grad is None and ref_weight.grad is None


def test_no_answer_tokens_gives_zero(seed):
    (hidden, weight, _), labels = batch("cpu")
    labels[:] = IGNORE
    for fn in (lambda: ue.fused_linear_npo(hidden, weight, labels, torch.zeros(B, dtype=torch.float64)),
               lambda: ue.fused_linear_simnpo(hidden, weight, labels)):
        hidden.grad = weight.grad = None
        out = fn()
        out.backward()
        assert out.item() == 0.0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_bad_sequence_inputs():
    (hidden, weight, _), labels = batch("cpu")
    (forget, retain) = (hidden, labels), (hidden, labels)
    cases = [
        ("ref_logprob", lambda: ue.fused_linear_npo(hidden, weight, labels, torch.zeros(B + 1))),
        ("ref_logprob", lambda: ue.fused_linear_npo(hidden, weight, labels, torch.zeros(B, device="meta"))),
        ("seq_index", lambda: ue.fused_linear_simnpo(hidden.reshape(B * T, H), weight, labels.reshape(-1))),
        ("seq_index", lambda: ue.fused_linear_simnpo(hidden.reshape(B * T, H), weight, labels.reshape(-1),
                                                     torch.full((B * T,), B), num_sequences=B)),
        ("labels", lambda: ue.fused_linear_npo(hidden, weight, None, torch.zeros(B))),
        ("beta", lambda: ue.fused_linear_npo(hidden, weight, labels, torch.zeros(B), beta=0.0)),
        ("beta", lambda: ue.fused_linear_simnpo(hidden, weight, labels, beta=float("nan"))),
        ("delta", lambda: ue.fused_linear_simnpo(hidden, weight, labels, delta=float("inf"))),
        ("forget_weight", lambda: ue.fused_linear_graddiff(*forget[:1], weight, forget[1], *retain,
                                                          forget_weight=float("nan"))),
        ("retain_weight", lambda: ue.fused_linear_npo_rt(hidden, weight, labels, torch.zeros(B), *retain,
                                                        retain_weight=float("inf"))),
    ]
    for word, call in cases:
        with pytest.raises(ValueError, match=word):
            call()
        tally("bad inputs")
