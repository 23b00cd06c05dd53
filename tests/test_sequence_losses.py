"""Sequence losses against a direct transcription of their formulas, one sequence at a
time, in float64 (values and gradients), on every backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import unlearn_ext as ue
from conftest import BACKEND_DEVICES, backend_params

BACKENDS = backend_params(BACKEND_DEVICES)


def batch(b=4, t=9, v=53, device="cpu", dtype=torch.float64):
    logits = (torch.randn(b, t, v, dtype=torch.float64) * 2).to(dtype).to(device)
    labels = torch.randint(0, v, (b, t), device=device)
    labels[:, :3] = -100  # prompt
    labels[1, :] = -100   # a sequence without answer tokens: left out of sequence means
    return logits, labels


def seq_logprob_loop(logits, labels):
    """ℓ_b and |y_b| by explicit loops over sequences and tokens."""
    out, counts = [], []
    for b in range(logits.shape[0]):
        total, n = logits.new_zeros((), dtype=torch.float64), 0
        for t in range(logits.shape[1]):
            if labels[b, t] != -100:
                total = total + F.log_softmax(logits[b, t].double(), -1)[labels[b, t]]
                n += 1
        out.append(total)
        counts.append(n)
    return out, counts


def npo_loop(logits, labels, ref, beta):
    lp, counts = seq_logprob_loop(logits, labels)
    terms = [2 / beta * F.softplus(beta * (lp[b] - ref[b])) for b in range(len(lp)) if counts[b] > 0]
    return sum(terms) / len(terms)


def simnpo_loop(logits, labels, beta, delta):
    lp, counts = seq_logprob_loop(logits, labels)
    terms = [2 / beta * F.softplus(-beta * (-lp[b] / counts[b] - delta)) for b in range(len(lp)) if counts[b] > 0]
    return sum(terms) / len(terms)


def nll_loop(logits, labels):
    lp, counts = seq_logprob_loop(logits, labels)
    return -sum(lp) / sum(counts)


def grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same(ours, ref, rtol=1e-6, atol=1e-9):
    (v1, g1), (v2, g2) = ours, ref  # the loops run on the CPU: compare there
    torch.testing.assert_close(v1.double().cpu(), v2.double().cpu(), rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol)


def _dtype(backend):
    # Kernel backends other than the CPU one compute in float32; float64 checks the formulas.
    return torch.float64 if backend[0] in ("torch", "cpu") else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprob(backend, seed):
    name, device = backend
    logits, labels = batch(device=device, dtype=_dtype(backend))
    lp, counts = ue.sequence_logprob(logits, labels, backend=name)
    ref, ref_counts = seq_logprob_loop(logits.cpu(), labels.cpu())
    torch.testing.assert_close(lp.double().cpu(), torch.stack(ref), rtol=1e-5, atol=1e-5)
    assert counts.cpu().tolist() == ref_counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprob_packed_rows(backend, seed):
    """[N, V] rows of several sequences with a sequence index equal the [B, T, V] form."""
    name, device = backend
    logits, labels = batch(device=device, dtype=_dtype(backend))
    b, t, v = logits.shape
    seq_index = torch.arange(b, device=device).repeat_interleave(t)
    packed = ue.sequence_logprob(logits.reshape(-1, v), labels.reshape(-1), seq_index, num_sequences=b, backend=name)
    batched = ue.sequence_logprob(logits, labels, backend=name)
    for x, y in zip(packed, batched):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo(backend, beta, seed):
    name, device = backend
    logits, labels = batch(device=device, dtype=_dtype(backend))
    ref_lp = torch.randn(4, dtype=torch.float64, device=device) * 5 - 20
    ours = grads(lambda x: ue.npo_loss(x, labels, ref_lp, beta=beta, backend=name), logits)
    ref = grads(lambda x: npo_loop(x.cpu(), labels.cpu(), ref_lp.cpu(), beta), logits)
    assert_same(ours, ref, rtol=1e-4 if _dtype(backend) == torch.float32 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta,delta", [(2.5, 0.0), (4.5, 0.5)])
def test_simnpo(backend, beta, delta, seed):
    name, device = backend
    logits, labels = batch(device=device, dtype=_dtype(backend))
    ours = grads(lambda x: ue.simnpo_loss(x, labels, beta=beta, delta=delta, backend=name), logits)
    ref = grads(lambda x: simnpo_loop(x.cpu(), labels.cpu(), beta, delta), logits)
    assert_same(ours, ref, rtol=1e-4 if _dtype(backend) == torch.float32 else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ga_and_graddiff(backend, seed):
    name, device = backend
    (f, fl), (r, rl) = batch(device=device, dtype=_dtype(backend)), batch(device=device, dtype=_dtype(backend))
    tol = dict(rtol=1e-4 if _dtype(backend) == torch.float32 else 1e-6)
    assert_same(grads(lambda x: ue.ga_loss(x, fl, backend=name), f),
                grads(lambda x: -nll_loop(x.cpu(), fl.cpu()), f), **tol)
    assert_same(grads(lambda x, y: ue.graddiff_loss(x, fl, y, rl, forget_weight=0.7, retain_weight=1.3,
                                                    backend=name), f, r),
                grads(lambda x, y: -0.7 * nll_loop(x.cpu(), fl.cpu()) + 1.3 * nll_loop(y.cpu(), rl.cpu()), f, r),
                **tol)


def kl_loop(logits, ref_logits, labels):
    """KL(π_ref ‖ π_θ) averaged over answer tokens."""
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if labels[b, t] != -100:
                q = F.log_softmax(ref_logits[b, t].double(), -1)
                terms.append((q.exp() * (q - F.log_softmax(logits[b, t].double(), -1))).sum())
    return sum(terms) / len(terms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_npo_with_retain_terms(backend, seed):
    name, device = backend
    dtype = _dtype(backend)
    (f, fl), (r, rl) = batch(device=device, dtype=dtype), batch(device=device, dtype=dtype)
    r_ref = torch.randn_like(r)
    ref_lp = torch.randn(4, dtype=torch.float64, device=device) - 15
    tol = dict(rtol=1e-4 if dtype == torch.float32 else 1e-6)
    assert_same(grads(lambda x, y: ue.npo_rt_loss(x, fl, ref_lp, y, rl, retain_weight=0.5, backend=name), f, r),
                grads(lambda x, y: npo_loop(x.cpu(), fl.cpu(), ref_lp.cpu(), 0.1) + 0.5 * nll_loop(y.cpu(), rl.cpu()),
                      f, r), **tol)
    assert_same(grads(lambda x, y: ue.npo_kl_loss(x, fl, ref_lp, y, rl, r_ref, backend=name), f, r),
                grads(lambda x, y: npo_loop(x.cpu(), fl.cpu(), ref_lp.cpu(), 0.1)
                      + kl_loop(y.cpu(), r_ref.cpu(), rl.cpu()), f, r), **tol)


def test_npo_is_2_ln2_over_beta_at_the_reference(seed):
    logits, labels = batch()
    lp, _ = ue.sequence_logprob(logits, labels)
    assert ue.npo_loss(logits, labels, lp, beta=0.1).item() == pytest.approx(2 / 0.1 * math.log(2))


def test_sequence_index_errors():
    logits, labels = batch()
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    with pytest.raises(ValueError, match="seq_index is required"):
        ue.sequence_logprob(flat, flat_labels)
    with pytest.raises(ValueError, match="seq_index must have the shape"):
        ue.sequence_logprob(flat, flat_labels, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_index"):
        ue.sequence_logprob(flat, flat_labels, torch.zeros(flat_labels.shape))
    with pytest.raises(ValueError, match="num_sequences"):
        ue.sequence_logprob(flat, flat_labels, torch.full_like(flat_labels, 7), num_sequences=4)
    with pytest.raises(ValueError, match="ref_logprob"):
        ue.npo_loss(logits, labels, torch.zeros(3))
