"""Fused-linear row ops against "materialise the logits in float64, then the reference op":
values and gradients w.r.t. hidden, weight and bias, on every backend available here."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from reliability_tally import tally
import torch
import torch.nn.functional as F

import unlearn_ext as ue
from unlearn_ext import reference
from unlearn_ext.fused_linear import _chunked

from conftest import BACKEND_DEVICES

IGNORE = -100
# Triton's CPU interpreter (backend triton on CPU tensors, make test's second pass) runs
# kernels in numpy: it gets the ops once (test_matches_reference, chunk 5, none and mean),
# the compiled backends every test.
INTERPRETED = ("triton", "cpu")


def backend_id(pair):
    return f"{pair[0]}-{pair[1]}"


BACKENDS = [pytest.param(p, id=backend_id(p)) for p in BACKEND_DEVICES if p != INTERPRETED]


@dataclass(frozen=True)
class Spec:
    name: str  # the row op
    teachers: tuple[str, ...] = ()  # argument names of the teacher heads
    labels_required: bool = True
    params: dict = field(default_factory=dict)

    def fused(self, student, teachers, labels, **kw):
        hidden, weight, bias, softcap = student
        fn = getattr(ue, f"fused_linear_{self.name}")
        return fn(hidden, weight, *teachers, labels, bias=bias, softcap=softcap, **self.params, **kw)

    def reference(self, student, teachers, labels, reduction, compute_dtype=None, temperature=1.0):
        """The loss on materialised logits (in the dtype of the inputs)."""
        logits = ue.LMHeadInputs(*student).logits()
        teacher_logits = [ue.LMHeadInputs(t.hidden.detach(), t.weight.detach(),
                                          None if t.bias is None else t.bias.detach(), t.softcap).logits()
                          for t in teachers]
        values = reference.ROW_OPS[self.name](logits, *teacher_logits, labels, compute_dtype=compute_dtype,
                                              temperature=temperature, **self.params)
        return reference.reduce(values, labels, reduction=reduction)


SPECS = [
    Spec("token_logprob"),
    Spec("cross_entropy"),
    Spec("forward_kl", ("teacher",), labels_required=False),
    Spec("reverse_kl", ("teacher",), labels_required=False),
    Spec("rkld", ("original", "augmented"), labels_required=False, params={"alpha": 3.0}),
    Spec("undial", ("teacher",), params={"gamma": 4.0}),
    Spec("jsd", ("teacher",), labels_required=False, params={"beta": 0.3}),
    Spec("cross_entropy", params={"label_smoothing": 0.1, "lse_square_scale": 1e-3}),
]
SPEC_IDS = [s.name + ("+options" if "label_smoothing" in s.params else "") for s in SPECS]


def make_case(spec, lead=(3, 13), hidden_size=16, vocab=101, *, dtype=torch.float64, device="cpu", bias=True,
              softcap=None, ignore_frac=0.3, tied=False, teacher_hidden_size=12, teacher_softcap=None):
    """Student (hidden, weight, bias, softcap) as leaves that require grad, teacher heads
    (their hidden states require grad too: they must not get any), labels."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_(True)

    hidden = leaf(*lead, hidden_size)
    weight = leaf(vocab, hidden_size, scale=hidden_size ** -0.5 * 2)
    student = (hidden, weight, leaf(vocab) if bias else None, softcap)
    teachers = []
    for _ in spec.teachers:
        if tied:  # the teacher shares the student's weight tensor (tied embeddings, self-distillation)
            teachers.append(ue.LMHeadInputs(leaf(*lead, hidden_size), weight, None, teacher_softcap))
        else:
            teachers.append(ue.LMHeadInputs(leaf(*lead, teacher_hidden_size),
                                            leaf(vocab, teacher_hidden_size, scale=teacher_hidden_size ** -0.5 * 2),
                                            leaf(vocab) if bias else None, teacher_softcap))
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignore_frac] = IGNORE
    return student, teachers, labels.to(device)


def grads_of(out, student, teachers, reduction, upstream):
    """Backward of one call; the gradients of the student's hidden, weight and bias."""
    leaves = [x for x in student[:3] if x is not None]
    for x in leaves + [t.hidden for t in teachers]:
        x.grad = None
    # a scalar loss gets an upstream gradient other than 1 too (the forward formed its gradient for 1)
    (out * upstream).sum().backward() if reduction == "none" else (out * -1.7).backward()
    return [x.grad for x in leaves]


def as_float64(student, teachers):
    """Float64 leaves with the values of the inputs (the oracle's own copies)."""
    def copy(x):
        return x.detach().double().requires_grad_(True) if isinstance(x, torch.Tensor) else x

    return tuple(copy(x) for x in student), [ue.LMHeadInputs(*(copy(x) for x in t)) for t in teachers]


def check(spec, backend, reduction, *, chunk_size=None, temperature=1.0, **case_kw):
    """The fused op against the reference on float64 logits: float64 inputs on the torch
    and cpu backends (exact up to rounding), float32 on kernels without float64 (CUDA,
    Triton), with float32 bounds."""
    name, device = backend
    dtype = dtype_for(backend)
    student, teachers, labels = make_case(spec, device=device, dtype=dtype, **case_kw)
    upstream = torch.randn(labels.shape, dtype=torch.float64, device=device)
    out = spec.fused(student, teachers, labels, reduction=reduction, backend=name, chunk_size=chunk_size,
                     temperature=temperature)
    got = grads_of(out, student, teachers, reduction, upstream.to(out.dtype))
    assert all(t.hidden.grad is None for t in teachers), "teacher hidden states must get no gradient"
    student64, teachers64 = as_float64(student, teachers)
    ref_out = spec.reference(student64, teachers64, labels, reduction, temperature=temperature)
    expected = grads_of(ref_out, student64, teachers64, reduction, upstream)
    where = f"{spec.name} {name}-{device} {reduction} chunk={chunk_size} {case_kw}"
    assert out.shape == ref_out.shape and out.dtype == (ref_out.dtype if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol, msg=lambda m: f"{where} value: {m}")
    for what, g, e, x in zip(("hidden", "weight", "bias"), got, expected, student):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{where} d_{what} dtype/shape"
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol, msg=lambda m: f"{where} d_{what}: {m}")
    return out, got


def dtype_for(backend):
    """float64 where the row kernels take it (torch, cpu); float32 elsewhere."""
    return torch.float64 if backend[0] in ("torch", "cpu") else torch.float32


REFERENCE_CASES = [
    pytest.param(backend, spec, reduction, chunk, id=f"{backend_id(backend)}-{sid}-{reduction}-chunk{chunk}")
    for backend in BACKEND_DEVICES for spec, sid in zip(SPECS, SPEC_IDS) for reduction in ("none", "sum", "mean")
    for chunk in (None, 1, 5, 64)
    if backend != INTERPRETED or (chunk == 5 and reduction != "sum")]


@pytest.mark.parametrize("backend,spec,reduction,chunk_size", REFERENCE_CASES)
def test_matches_reference(backend, spec, reduction, chunk_size, seed):
    """Exact up to rounding; chunk sizes that do not divide the rows, 1, and larger than
    the rows; per-row upstream gradients for 'none'."""
    check(spec, backend, reduction, chunk_size=chunk_size, bias=chunk_size != 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softcap_and_temperature(backend, spec, reduction, seed):
    """Gemma-2 logit softcapping c·tanh(z/c) on the student (chain rule through tanh) and
    the teachers, with a temperature."""
    check(spec, backend, reduction, chunk_size=7, softcap=1.5, teacher_softcap=2.5, temperature=1.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.5, 1.0], ids=["none", "half", "all"])
def test_ignored_rows(backend, spec, ignore_frac, seed):
    out, grads = check(spec, backend, "mean", chunk_size=4, ignore_frac=ignore_frac)
    if ignore_frac == 1.0 and spec.labels_required:
        assert out.item() == 0.0 and all(torch.all(g == 0) for g in grads), "no row counts: 0, not NaN"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [s for s in SPECS if s.teachers], ids=[s.name for s in SPECS if s.teachers])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_tied_weight(backend, spec, reduction, seed):
    """Teacher and student share one weight tensor: only the student's use of it gets a
    gradient (the reference detaches the teacher's logits)."""
    check(spec, backend, reduction, chunk_size=6, tied=True, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_low_precision_no_worse_than_eager(backend, dtype, spec, seed):
    """float32 / bfloat16: no further from the float64 result than PyTorch doing the same
    (the logits matmul and the loss in that dtype), up to a factor for the different
    summation order of the chunked d_weight."""
    name, device = backend
    student, teachers, labels = make_case(spec, lead=(4, 16), hidden_size=64, vocab=517, dtype=dtype,
                                          device=device, bias=True, softcap=20.0, teacher_softcap=20.0)
    upstream = torch.randn(labels.shape, device=device)
    out = spec.fused(student, teachers, labels, reduction="none", backend=name, chunk_size=24)
    got = grads_of(out, student, teachers, "none", upstream.to(out.dtype))
    eager = spec.reference(student, teachers, labels, "none")  # PyTorch: matmul in dtype, loss in float32
    eager_grads = grads_of(eager, student, teachers, "none", upstream)

    student64, teachers64 = as_float64(student, teachers)
    exact = spec.reference(student64, teachers64, labels, "none")
    exact_grads = grads_of(exact, student64, teachers64, "none", upstream.double())
    eps = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}[dtype]
    for what, g, e, x in zip(("value", "hidden", "weight", "bias"), [out] + got, [eager] + eager_grads,
                             [exact] + exact_grads):
        err = (g.double() - x.double()).norm().item()
        base = (e.double() - x.double()).norm().item()
        bound = 2.0 * base + 8 * eps * x.double().norm().item() + 1e-12
        assert err <= bound, f"{spec.name} {name} {dtype} {what}: error {err:.3e} > {bound:.3e} (eager: {base:.3e})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_hidden_read_in_place(backend, seed):
    """hidden[:, :-1] with labels[:, 1:] (a strided view, rows gathered per chunk) and the
    full hidden with shift_labels(labels) give the same loss and the same gradient."""
    name, device = backend
    spec = SPECS[1]
    dtype = dtype_for(backend)
    (hidden, weight, bias, _), _, labels = make_case(spec, lead=(3, 11), device=device, dtype=dtype)
    shifted = ue.fused_linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], bias=bias, backend=name,
                                            chunk_size=4)
    (g_shifted,) = torch.autograd.grad(shifted, hidden)
    full = ue.fused_linear_cross_entropy(hidden, weight, ue.shift_labels(labels), bias=bias, backend=name,
                                         chunk_size=4)
    (g_full,) = torch.autograd.grad(full, hidden)
    eager = ue.cross_entropy(F.linear(hidden, weight, bias)[:, :-1], labels[:, 1:], backend="torch")
    (g_eager,) = torch.autograd.grad(eager, hidden)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, expected in ((shifted, eager), (full, eager), (g_shifted, g_eager), (g_full, g_eager)):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert torch.all(g_full[:, -1] == 0), "the last position predicts nothing"


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3], [-100, 5, 6]])
    assert torch.equal(ue.shift_labels(labels), torch.tensor([[2, 3, -100], [5, 6, -100]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_hold_at_most_chunk_size_rows(backend, monkeypatch, seed):
    """The loop forms one chunk of logits at a time, never more rows than chunk_size, and
    skips ignored rows (the structure behind "peak memory independent of N")."""
    name, device = backend
    shapes = []
    real = _chunked._logits
    monkeypatch.setattr(_chunked, "_logits", lambda h, w, b: shapes.append(tuple(h.shape)) or real(h, w, b))
    spec = SPECS[2]
    student, teachers, labels = make_case(spec, lead=(5, 20), device=device)
    ue.fused_linear_forward_kl(student[0], student[1], teachers[0], labels, bias=student[2], backend=name,
                               chunk_size=16).backward()
    counted = int((labels != IGNORE).sum())
    student_chunks = shapes[0::2]  # student then teacher, chunk after chunk
    assert [s[0] for s in student_chunks] == [min(16, counted - s) for s in range(0, counted, 16)]


def test_default_chunk_rows():
    gpu = _chunked.default_chunk_rows(128256, 4096, 128256 * 2, torch.device("cuda"))
    cpu = _chunked.default_chunk_rows(128256, 2048, 128256 * 4, torch.device("cpu"))
    assert gpu % 64 == 0 and gpu >= _chunked.MIN_CHUNK_ROWS["cuda"]
    assert cpu % 64 == 0 and cpu >= _chunked.MIN_CHUNK_ROWS["cpu"]
    # more bytes per row (teachers): fewer rows, but never below the floor
    assert _chunked.default_chunk_rows(32000, 8192, 32000 * 2, torch.device("cpu")) >= \
        _chunked.default_chunk_rows(32000, 8192, 3 * 32000 * 2, torch.device("cpu"))
    assert _chunked.default_chunk_rows(10, 4, 40, torch.device("cpu")) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_applies_the_head_in_autocast_dtype(backend, seed):
    """Under autocast a float32 head runs in bf16, as F.linear would, and the float32
    master weight gets a float32 gradient."""
    name, device = backend
    hidden = torch.randn(6, 32, device=device, requires_grad=True)
    weight = torch.randn(50, 32, device=device, requires_grad=True)
    labels = torch.randint(0, 50, (6,), device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = ue.fused_linear_cross_entropy(hidden, weight, labels, backend=name)
    out.backward()
    expected = ue.fused_linear_cross_entropy(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels,
                                             backend=name)
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_frozen_weight(backend, monkeypatch, seed):
    """Values without any gradient work under no_grad; a frozen head gets no gradient."""
    name, device = backend
    spec = SPECS[1]
    (hidden, weight, bias, _), _, labels = make_case(spec, device=device, dtype=dtype_for(backend))
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(_chunked, "_accumulate_weight_grad", lambda *a: pytest.fail("gradient work under no_grad"))
        value = ue.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=name)
    frozen = weight.detach()
    out = ue.fused_linear_cross_entropy(hidden, frozen, labels, bias=bias, backend=name)
    out.backward()
    torch.testing.assert_close(value, out.detach())
    assert frozen.grad is None and hidden.grad is not None and bias.grad is not None


def test_empty_batch():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    for reduction in ("none", "sum", "mean"):
        out = ue.fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        assert out.shape == ((0,) if reduction == "none" else ())
    out = ue.fused_linear_cross_entropy(hidden, weight, labels)
    out.backward()
    assert out.item() == 0.0 and torch.all(weight.grad == 0) and hidden.grad.shape == (0, 8)


# ---- bad input: a clear error naming the argument ------------------------------------------
@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in {p[0] for p in BACKEND_DEVICES}])
def test_bad_inputs(backend):
    h, w, b = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10)
    y = torch.randint(0, 10, (4,))
    t = ue.LMHeadInputs(torch.randn(4, 6), torch.randn(10, 6))
    ce = lambda *a, **k: ue.fused_linear_cross_entropy(*a, backend=backend, **k)  # noqa: E731
    kl = lambda *a, **k: ue.fused_linear_forward_kl(*a, backend=backend, **k)  # noqa: E731
    cases = [
        (TypeError, "hidden", lambda: ce(h.tolist(), w, y)),
        (TypeError, "hidden", lambda: ce(h.long(), w, y)),
        (ValueError, "hidden", lambda: ce(h[0], w, y)),
        (ValueError, "weight", lambda: ce(h, w[:, :5], y)),
        (ValueError, "weight", lambda: ce(h, w[None], y)),
        (TypeError, "weight", lambda: ce(h, w.double(), y)),
        (ValueError, "weight", lambda: ce(h, w.to("meta"), y)),
        (ValueError, "bias", lambda: ce(h, w, y, bias=b[:7])),
        (TypeError, "bias", lambda: ce(h, w, y, bias=b.double())),
        (ValueError, "labels", lambda: ce(h, w, y[:3])),
        (TypeError, "labels", lambda: ce(h, w, y.float())),
        (ValueError, "labels", lambda: ce(h, w, torch.full_like(y, 10))),
        (ValueError, "labels", lambda: ce(h, w, None)),
        (ValueError, "softcap", lambda: ce(h, w, y, softcap=0.0)),
        (TypeError, "softcap", lambda: ce(h, w, y, softcap=[30.0])),
        (ValueError, "chunk_size", lambda: ce(h, w, y, chunk_size=0)),
        (TypeError, "chunk_size", lambda: ce(h, w, y, chunk_size=2.0)),
        (ValueError, "reduction", lambda: ce(h, w, y, reduction="avg")),
        (ValueError, "temperature", lambda: ce(h, w, y, temperature=-1.0)),
        (ValueError, "backend", lambda: ue.fused_linear_cross_entropy(h, w, y, backend="tpu")),
        (ValueError, "empty vocabulary", lambda: ce(h, w[:0], y)),
        (TypeError, "teacher", lambda: kl(h, w, t.hidden, y)),
        (ValueError, "teacher.hidden", lambda: kl(h, w, (t.hidden[:3], t.weight), y)),
        (ValueError, "teacher.weight", lambda: kl(h, w, (t.hidden, t.weight[:9]), y)),
        (TypeError, "teacher.weight", lambda: kl(h, w, (t.hidden, t.weight.double()), y)),
        (ValueError, "teacher.hidden", lambda: kl(h, w, (t.hidden.to("meta"), t.weight.to("meta")), y)),
        (ValueError, "original.weight", lambda: ue.fused_linear_rkld(h, w, (t.hidden, t.weight[:3]), t, y,
                                                                    backend=backend)),
        (ValueError, "alpha", lambda: ue.fused_linear_rkld(h, w, t, t, y, alpha=-1.0, backend=backend)),
        (ValueError, "gamma", lambda: ue.fused_linear_undial(h, w, t, y, gamma=float("inf"), backend=backend)),
    ]
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()
        tally("bad inputs")


def test_unavailable_backend_says_why():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    for name in ("cuda", "triton"):
        if not ue.backends()[name].available:
            with pytest.raises(RuntimeError, match=name):
                ue.fused_linear_cross_entropy(h, w, y, backend=name)
