"""Property-based tests (hypothesis) of every row op and sequence loss on every backend here.

Hypothesis draws the *description* of a case (shape, dtype, value range, masks, ignored
rows, temperature, γ/α/β, a seed for the tensors) and shrinks a failure to the smallest
such description; the tensors themselves come from torch's generator seeded by the draw.

Invariants:
  * value and gradient match the float64 reference within row_op_suite's bounds (no worse
    than PyTorch in the input's dtype; kernel backends element-wise to float32 accuracy);
  * KL, cross-entropy and UnDIAL's soft CE are ≥ 0 and log-probabilities ≤ 0 (up to the
    same rounding); every op's gradient sums to ~0 over V (all are softmax gradients);
    ignored rows get an exact zero gradient;
  * rows are independent: splitting the rows over several calls, the CPU thread count,
    repeating a call, the value of ignore_index and the fused forward-gradient path
    (reduction="sum") do not change a bit of any row's result; inputs are never written;
  * sequence losses (NPO with log-ratios up to ±100, SimNPO, GA, GradDiff) match the
    float64 composition of reference ops.

CI runs a derandomised profile (the same cases every run, no example database); set
UNLEARN_EXT_FUZZ_EXAMPLES=<n> for a longer, randomised search (n examples per test).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unlearn_ext as ue
from unlearn_ext import reference

from conftest import BACKEND_DEVICES
from reliability_tally import tally
from row_op_suite import (EPS, IGNORE, TINY, OpSpec, assert_elementwise, check_outputs, input_span, is_interpreted,
                          log_ratio_weight, make_inputs, run)

_LONG_RUN = int(os.environ.get("UNLEARN_EXT_FUZZ_EXAMPLES", "0"))


def fuzz_settings(ci_examples: int):
    """CI: `ci_examples` fixed cases per test (derandomised, no database); a long run
    draws UNLEARN_EXT_FUZZ_EXAMPLES fresh cases per test."""
    return settings(max_examples=_LONG_RUN or ci_examples, derandomize=not _LONG_RUN, database=None,
                    deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


SPECS = {
    "token_logprob": OpSpec("token_logprob", teachers=0, labels_required=True),
    "cross_entropy": OpSpec("cross_entropy", teachers=0, labels_required=True),
    "forward_kl": OpSpec("forward_kl", teachers=1, labels_required=False),
    "reverse_kl": OpSpec("reverse_kl", teachers=1, labels_required=False),
    "rkld": OpSpec("rkld", teachers=2, labels_required=False),
    "undial": OpSpec("undial", teachers=1, labels_required=True),
}
OPS = list(SPECS)
# The Triton interpreter runs a kernel in Python (seconds per call): it gets a few cases.
COMPILED = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in BACKEND_DEVICES if not is_interpreted(p)]
INTERPRETED = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in BACKEND_DEVICES if is_interpreted(p)]
CPP_KERNELS = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in BACKEND_DEVICES if p[0] == "cpu"]
FLOAT64_BACKENDS = ("torch", "cpu", "cuda")  # Triton computes in float32 and refuses float64
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SCALES = [1e-6, 0.1, 1.0, 3.0, 30.0, 1e4]  # tiny (near-uniform rows) to huge logits
MASKS = [None, "rows", "vocab"]  # -inf rows but one entry, ~30 % of the vocabulary masked
SIGN = {"token_logprob": -1, "cross_entropy": 1, "forward_kl": 1, "reverse_kl": 1, "rkld": 1, "undial": 1}


def draw_spec(data, op):
    """The op with drawn parameters: α ≥ 0 for RKLD, any finite γ for UnDIAL."""
    params = {}
    if op == "rkld":
        params["alpha"] = data.draw(st.sampled_from([0.0, 1.0, 8.0]) | st.floats(0.0, 40.0), label="alpha")
    if op == "undial":
        params["gamma"] = data.draw(st.sampled_from([3.0, 10.0, 30.0]) | st.floats(-10.0, 50.0), label="gamma")
    base = SPECS[op]
    return OpSpec(base.name, base.teachers, base.labels_required, params)


def draw_shape(data, backend, max_rows=8, max_vocab=5000):
    """[N, V] or [B, T, V]: N from 0, V from 1 (tiny under the Triton interpreter), now and
    then a large vocabulary."""
    if is_interpreted(backend):
        max_rows, max_vocab = min(max_rows, 4), 300
    vocab = data.draw(st.integers(1, max_vocab), label="V")
    if not is_interpreted(backend) and data.draw(st.integers(0, 9), label="large V?") == 0:
        vocab = data.draw(st.sampled_from([32003, 65536, 131075]), label="large V")
        max_rows = 2
    if data.draw(st.booleans(), label="3-D?"):
        return (data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(0, max(1, max_rows // 2)), label="T"),
                vocab)
    return (data.draw(st.integers(0, max_rows), label="N"), vocab)


def draw_inputs(data, spec, backend, shape):
    """Logits, teachers and labels for a drawn value range, masking and ignore pattern."""
    dtypes = ALL_DTYPES if backend[0] in FLOAT64_BACKENDS else ALL_DTYPES[:3]
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    kw = dict(scale=data.draw(st.sampled_from(SCALES), label="scale"),
              mask=data.draw(st.sampled_from(MASKS), label="mask"),
              peaked=data.draw(st.booleans(), label="peaked"),
              ignore_frac=data.draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]), label="ignore_frac"))
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    logits, teachers, labels = make_inputs(spec, shape, dtype, backend[1], **kw)
    return logits, teachers, labels, kw["scale"]


def draw_temperature(data):
    return data.draw(st.sampled_from([1.0, 0.5, 2.0]) | st.floats(0.2, 5.0), label="temperature")


def check_float64(spec, backend, logits, teachers, labels, reduction, upstream, temperature, size):
    """float64 inputs are computed in float64: within a few thousand float64 ulps of the
    reference (sums over V round too), a million times closer than float32 arithmetic gets."""
    kw = dict(reduction=reduction, temperature=temperature)
    out, grad = run(lambda *a, **k: spec(*a, backend=backend[0], **k), logits, teachers, labels, upstream=upstream,
                    **kw)
    ref_out, ref_grad = run(lambda x, t, y, reduction, **k: reference.reduce(spec.reference(x, t, y, **k), y,
                                                                             reduction=reduction),
                            logits, teachers, labels, upstream=upstream, **kw)
    where = f"{spec.name} {backend} {tuple(logits.shape)} float64 {reduction}"
    assert out.dtype == torch.float64 and grad.dtype == torch.float64, f"{where}: computed in {out.dtype}"
    g_scale = upstream.abs().max().item() if reduction == "none" and upstream.numel() else 1.0
    rows = max(1, logits.numel() // logits.shape[-1])
    assert_elementwise(out, ref_out, torch.float64, f"{where} value", atol=4096 * EPS[torch.float64] * size * rows)
    assert_elementwise(grad, ref_grad, torch.float64, f"{where} gradient",
                       atol=4096 * EPS[torch.float64] * size * g_scale)
    return out, grad


# ---- every row op against the float64 reference, plus sign and gradient-sum invariants ------------

def row_op_matches_reference(op, backend, data):
    tally("fuzz cases")
    spec = draw_spec(data, op)
    shape = draw_shape(data, backend)
    logits, teachers, labels, _ = draw_inputs(data, spec, backend, shape)
    reduction = data.draw(st.sampled_from(["none", "sum", "mean"]), label="reduction")
    temperature = draw_temperature(data)
    upstream = torch.randn(shape[:-1], dtype=torch.float64, device=backend[1])
    # float32 rounding of a value scales with the logits and with log V (log-probabilities)
    size = max(1.0, input_span(spec, logits, teachers) / temperature + math.log(max(shape[-1], 1)))
    if logits.dtype == torch.float64:
        out, grad = check_float64(spec, backend, logits, teachers, labels, reduction, upstream, temperature, size)
    else:
        out, grad = check_outputs(spec, backend, logits, teachers, labels, reduction, upstream,
                                  temperature=temperature)

    if reduction == "none":
        values = out[torch.isfinite(out)] * SIGN[op]
        assert torch.all(values >= -8 * EPS[torch.float32] * max(1.0, size)), (
            f"{op}: a value has the wrong sign ({values.min().item():.3e})")
    # Every op's gradient is a difference of two distributions (or p ⊙ (log p/q − KL)):
    # it sums to 0 over V, up to the rounding of each element in its dtype and float32's
    # on the terms it is made of (see row_op_suite.log_ratio_weight); p = exp(log p) is
    # rounded relative to |log p| ~ log V.
    g = grad.double().cpu().reshape(-1, shape[-1])
    rows_ok = torch.isfinite(g).all(-1)
    weight = (upstream.abs().reshape(-1).cpu() if reduction == "none"
              else torch.ones(g.shape[0], dtype=torch.float64))
    w = log_ratio_weight(spec, logits, teachers, temperature)
    terms = 1 + (w.reshape(-1, shape[-1]).sum(-1) if isinstance(w, torch.Tensor) else 0.0)
    bound = (4 * EPS[logits.dtype] * g.abs().sum(-1) + shape[-1] * TINY[logits.dtype]
             + 16 * EPS[torch.float32] * weight / temperature * terms * (1 + math.log(shape[-1])))
    excess = (g.sum(-1).abs() - bound)[rows_ok]
    assert torch.all(excess <= 0), f"{op}: gradient does not sum to 0 over V (excess {excess.max().item():.3e})"


# ---- rows are independent: chunking, threads, repetition, ignore_index, fused path --------------

def call_rows(spec, backend, logits, teachers, labels, upstream, **kw):
    """Per-row values and logits-gradient for reduction='none' with a per-row upstream."""
    x = logits.detach().clone().requires_grad_(True)
    out = spec(x, teachers, labels, backend=backend[0], reduction="none", **kw)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{what}: {int((~same).sum())} element(s) differ"


def rows_are_independent(op, backend, data):
    tally("fuzz cases")
    spec = draw_spec(data, op)
    # Enough elements that the CPU kernels split rows across threads (grain 2^15 elements);
    # fewer for the torch backend, which is PyTorch itself.
    shape = draw_shape(data, backend, max_rows=8 if backend[0] == "torch" else 48, max_vocab=3000)
    logits, teachers, labels, _ = draw_inputs(data, spec, backend, shape)
    temperature = draw_temperature(data)
    upstream = torch.randn(shape[:-1], device=backend[1])
    before = [x.clone() for x in [logits, *teachers]]
    out, grad = call_rows(spec, backend, logits, teachers, labels, upstream, temperature=temperature)
    for x, y in zip([logits, *teachers], before):
        assert_bitwise(x, y, f"{op}: an input was written")

    again = call_rows(spec, backend, logits, teachers, labels, upstream, temperature=temperature)
    assert_bitwise(again[0], out, f"{op}: repeated call, value")
    assert_bitwise(again[1], grad, f"{op}: repeated call, gradient")

    flat = lambda x: x.reshape(-1, shape[-1])  # noqa: E731
    rows = flat(logits).shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, rows), max_size=4), label="cuts"))
    parts = [(a, b) for a, b in zip([0, *cuts], [*cuts, rows])]
    pieces = [call_rows(spec, backend, flat(logits)[a:b], [flat(t)[a:b] for t in teachers],
                        labels.reshape(-1)[a:b], upstream.reshape(-1)[a:b], temperature=temperature)
              for a, b in parts]
    assert_bitwise(torch.cat([p[0] for p in pieces]), out.reshape(-1), f"{op}: rows split as {parts}, value")
    assert_bitwise(torch.cat([p[1] for p in pieces]), flat(grad), f"{op}: rows split as {parts}, gradient")

    ignore_index = data.draw(st.sampled_from([-1, -2**40, shape[-1], 2**40]), label="ignore_index")
    moved = torch.where(labels == IGNORE, torch.full_like(labels, ignore_index), labels)
    other = call_rows(spec, backend, logits, teachers, moved, upstream, temperature=temperature,
                      ignore_index=ignore_index)
    assert_bitwise(other[0], out, f"{op}: ignore_index={ignore_index}, value")
    assert_bitwise(other[1], grad, f"{op}: ignore_index={ignore_index}, gradient")

    # reduction="sum" may write the gradient during the forward (fused path): the backward
    # kernel's numbers with an upstream gradient of 1, up to rounding — the fused CPU forward
    # forms p from pass 1's exponentials, exp(s − block max) · exp(max − lse), where the
    # backward kernel takes exp(s − lse): a few float32 roundings, then the gradient's dtype's.
    x = logits.detach().clone().requires_grad_(True)
    spec(x, teachers, labels, backend=backend[0], reduction="sum", temperature=temperature).backward()
    kernel = call_rows(spec, backend, logits, teachers, labels, torch.ones_like(upstream), temperature=temperature)[1]
    # Absolute: float32 roundings of the terms (probabilities ≤ 1, times the log-ratio weights
    # of KL-type ops), which cancel in a gradient like q − p; relative: the gradient's dtype.
    w = log_ratio_weight(spec, logits, teachers, temperature)
    terms = 1 + (float(w.max()) if isinstance(w, torch.Tensor) and w.numel() else 0.0)
    torch.testing.assert_close(x.grad, kernel, rtol=4 * EPS[kernel.dtype],
                               atol=32 * EPS[torch.float32] * terms / temperature + TINY[torch.float32],
                               equal_nan=True, msg=lambda m: f"{op}: fused sum gradient: {m}")


def thread_count_does_not_change_results(op, backend, data):
    tally("fuzz cases")
    spec = draw_spec(data, op)
    shape = (data.draw(st.integers(8, 64), label="N"), data.draw(st.integers(1024, 6000), label="V"))
    logits, teachers, labels, _ = draw_inputs(data, spec, backend, shape)
    upstream = torch.randn(shape[0])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for reduction in ("none", "mean"):
                x = logits.clone().requires_grad_(True)
                out = spec(x, teachers, labels, backend=backend[0], reduction=reduction)
                (out * upstream).sum().backward() if reduction == "none" else out.backward()
                results.append((n, reduction, out.detach(), x.grad))
    finally:
        torch.set_num_threads(threads)
    for n, reduction, out, grad in results[2:]:
        ref = next(r for r in results if r[1] == reduction)
        assert_bitwise(out, ref[2], f"{op}: {n} threads vs 1, {reduction} value")
        assert_bitwise(grad, ref[3], f"{op}: {n} threads vs 1, {reduction} gradient")


# ---- sequence losses: NPO (log-ratios up to ±100), SimNPO, GA, GradDiff --------------------------

def draw_sequences(data, backend, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """[B, T, V] answer logits and labels (some sequences without any answer token), and
    the same rows packed as [N, V] with a sequence index."""
    b = data.draw(st.integers(1, 4), label="B")
    t = data.draw(st.integers(1, 3 if is_interpreted(backend) else 6), label="T")
    v = data.draw(st.integers(2, 200 if is_interpreted(backend) else 2000), label="V")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    scale = data.draw(st.sampled_from([0.1, 1.0, 3.0, 30.0]), label="scale")
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    logits = (torch.randn(b, t, v, dtype=torch.float64) * scale).to(dtype).to(backend[1])
    labels = torch.randint(0, v, (b, t))
    prompt = torch.rand(b, t) < data.draw(st.sampled_from([0.0, 0.3, 0.7]), label="prompt share")
    labels[prompt] = IGNORE
    if data.draw(st.booleans(), label="a sequence without answer"):
        labels[0] = IGNORE
    return logits, labels.to(backend[1])


def run_loss(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


def check_sequence_loss(ours, ref, logits, what, value_tol, grad_tol):
    out, grad = run_loss(ours, logits)
    ref_out, ref_grad = run_loss(ref, logits.double())
    assert torch.isfinite(out) and torch.isfinite(grad).all(), f"{what}: non-finite value or gradient"
    assert abs(out.item() - ref_out.item()) <= value_tol + 8 * EPS[torch.float32] * abs(ref_out.item()), (
        f"{what}: value {out.item():.9g} vs float64 {ref_out.item():.9g}")
    rtol = 2 * EPS[logits.dtype] if logits.dtype != torch.float32 else 1e-5
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=rtol, atol=grad_tol + TINY[logits.dtype],
                               msg=lambda m: f"{what} gradient: {m}")
    return out, grad


def logprob_error(logits):
    """Bound on the float32 error of a sequence's summed token log-probs."""
    return logits.shape[-2] * 8 * EPS[torch.float32] * max(1.0, logits.double().abs().max().item())


def npo_matches_reference(backend, data):
    tally("fuzz cases")
    logits, labels = draw_sequences(data, backend)
    b = logits.shape[0]
    beta = data.draw(st.sampled_from([0.1, 1.0, 5.0]) | st.floats(0.01, 5.0), label="beta")
    ratio = torch.tensor(data.draw(st.lists(st.sampled_from([-100.0, 100.0, 0.0]) | st.floats(-100.0, 100.0),
                                            min_size=b, max_size=b), label="log-ratios"), dtype=torch.float64)
    packed = data.draw(st.booleans(), label="packed")
    # ℓ_ref = ℓ − ratio, so the loss sees log-ratios ℓ − ℓ_ref of exactly `ratio` (in float64).
    ell = reference.token_logprob(logits.double(), labels).sum(-1).cpu()
    ref_logprob = (ell - ratio).to(logits.device)
    kw = dict(beta=beta)
    if packed:
        seq_index = torch.arange(b, device=logits.device).repeat_interleave(logits.shape[1])
        kw.update(seq_index=seq_index, num_sequences=b)

    def args(x):
        return (x.reshape(-1, x.shape[-1]), labels.reshape(-1)) if packed else (x, labels)

    ours = lambda x: ue.npo_loss(*args(x), ref_logprob.float(), backend=backend[0], **kw)  # noqa: E731
    ref = lambda x: ue.npo_loss(*args(x), ref_logprob, backend="torch", **kw)  # noqa: E731
    err = logprob_error(logits)  # softplus' slope is ≤ 1: the loss moves by ≤ 2·err
    nseq = max(1, int((labels != IGNORE).any(-1).sum()))
    out, grad = check_sequence_loss(ours, ref, logits, f"npo β={beta}", value_tol=2 * err + 1e-30,
                                    grad_tol=(2 / nseq) * (beta * err / 4 + 8 * EPS[torch.float32]))
    assert out.item() >= 0, "NPO is a softplus: never negative"
    assert torch.all(grad[labels == IGNORE] == 0), "prompt and padding tokens get an exact zero gradient"


def simnpo_matches_reference(backend, data):
    tally("fuzz cases")
    logits, labels = draw_sequences(data, backend)
    beta = data.draw(st.sampled_from([2.5, 4.5]) | st.floats(0.1, 10.0), label="beta")
    delta = data.draw(st.sampled_from([0.0]) | st.floats(-3.0, 3.0), label="delta")
    ours = lambda x: ue.simnpo_loss(x, labels, beta=beta, delta=delta, backend=backend[0])  # noqa: E731
    ref = lambda x: ue.simnpo_loss(x, labels, beta=beta, delta=delta, backend="torch")  # noqa: E731
    err = logprob_error(logits)
    nseq = max(1, int((labels != IGNORE).any(-1).sum()))
    _, grad = check_sequence_loss(ours, ref, logits, f"simnpo β={beta} δ={delta}", value_tol=2 * err + 1e-30,
                                  grad_tol=(2 / nseq) * (beta * err / 4 + 8 * EPS[torch.float32]))
    assert torch.all(grad[labels == IGNORE] == 0)


def ga_and_graddiff_match_reference(backend, data):
    tally("fuzz cases")
    forget, forget_labels = draw_sequences(data, backend)
    retain, retain_labels = draw_sequences(data, backend, dtypes=(forget.dtype,))
    w_f = data.draw(st.floats(0.0, 5.0), label="forget_weight")
    w_r = data.draw(st.floats(0.0, 5.0), label="retain_weight")
    use_kl = data.draw(st.booleans(), label="retain KL")
    ref_logits = (retain.double() + torch.randn_like(retain.double())).to(retain.dtype) if use_kl else None
    err = logprob_error(forget) + logprob_error(retain)
    grad_tol = 16 * EPS[torch.float32] * max(1.0, w_f, w_r)

    def both(x, backend_name):
        # One leaf holds both batches (same [B, T, V] shape), so a single gradient covers them.
        f, r = x[: forget.shape[0]], x[forget.shape[0]:]
        rr = None if ref_logits is None else (ref_logits.double() if x.dtype == torch.float64 else ref_logits)
        return ue.graddiff_loss(f, forget_labels, r, retain_labels, forget_weight=w_f, retain_weight=w_r,
                                retain_ref_logits=rr, backend=backend_name)

    joint = torch.cat([forget, retain]) if forget.shape[1:] == retain.shape[1:] else None
    if joint is not None:
        check_sequence_loss(lambda x: both(x, backend[0]), lambda x: both(x, "torch"), joint,
                            f"graddiff w_f={w_f} w_r={w_r} kl={use_kl}", value_tol=(w_f + w_r) * err + 1e-30,
                            grad_tol=grad_tol)
    check_sequence_loss(lambda x: ue.ga_loss(x, forget_labels, backend=backend[0]),
                        lambda x: ue.ga_loss(x, forget_labels, backend="torch"), forget, "ga",
                        value_tol=err + 1e-30, grad_tol=grad_tol)


def fuzz(body, ci_examples, backends, ops=None):
    """A hypothesis test of body(op?, backend, data), parametrised over backends (and ops)."""
    test = fuzz_settings(ci_examples)(given(data=st.data())(body))
    test = pytest.mark.parametrize("backend", backends)(test)
    return pytest.mark.parametrize("op", ops)(test) if ops else test


test_row_op_matches_reference = fuzz(row_op_matches_reference, 15, COMPILED, ops=OPS)
if INTERPRETED:
    test_row_op_matches_reference_interpreted = fuzz(row_op_matches_reference, 2, INTERPRETED, ops=OPS)
test_rows_are_independent = fuzz(rows_are_independent, 8, COMPILED, ops=OPS)
if INTERPRETED:
    test_rows_are_independent_interpreted = fuzz(rows_are_independent, 1, INTERPRETED, ops=OPS)
test_thread_count_does_not_change_results = fuzz(thread_count_does_not_change_results, 4, CPP_KERNELS, ops=OPS)
test_npo_matches_reference = fuzz(npo_matches_reference, 20, COMPILED)
if INTERPRETED:
    test_npo_matches_reference_interpreted = fuzz(npo_matches_reference, 2, INTERPRETED)
test_simnpo_matches_reference = fuzz(simnpo_matches_reference, 20, COMPILED)
if INTERPRETED:
    test_simnpo_matches_reference_interpreted = fuzz(simnpo_matches_reference, 2, INTERPRETED)
test_ga_and_graddiff_match_reference = fuzz(ga_and_graddiff_match_reference, 20, COMPILED)
if INTERPRETED:
    test_ga_and_graddiff_match_reference_interpreted = fuzz(ga_and_graddiff_match_reference, 1, INTERPRETED)


def test_fuzz_profile_is_reproducible_in_ci():
    """CI draws the same cases every run (a failure there can be replayed) and keeps no
    example database in the working tree."""
    if _LONG_RUN:
        pytest.skip("UNLEARN_EXT_FUZZ_EXAMPLES is set: a randomised long run")
    s = fuzz_settings(1)
    assert s.derandomize and s.database is None and math.isfinite(s.max_examples)
