"""The bad-input matrix: every public function of unlearn_ext, and the raw torch ops, given
wrong dtypes, shapes, devices, strides, labels, teachers, parameters and backends. Each
case must raise the expected exception type with a message that names the problem; none
may crash the interpreter. (tests/row_op_suite.py's test_bad_inputs covers the basic
per-op cases on every op; this file adds the rest.)

The raw ops (torch.ops.unlearn_ext.*) skip the Python checks, so their C++ argument checks
are all that stands between a bad tensor and memory: they run in a subprocess, which must
exit normally with one Python exception per case, never die from a signal.

Later parts (trainer, CLI) add their cases to this matrix: a case is (id, exception,
words the message must contain, a callable).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext._backends import resolve
from unlearn_ext.ops._row_loss import RowParams

from conftest import BACKEND_DEVICES
from reliability_tally import tally

IGNORE = -100
N, V = 4, 10


def expect(exc, words, call):
    """`call()` raises `exc` with every one of `words` in its message (case-insensitive)."""
    tally("bad inputs")
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert re.search(re.escape(word), message, re.IGNORECASE), f"{word!r} not in the message: {message}"


# ---- raw torch ops, in a subprocess ---------------------------------------------------------------

def raw_cases(device="cpu"):
    """(id, exception name, words, call) for torch.ops.unlearn_ext.* on `device`; None as
    the exception means the call must succeed (legal edge input)."""
    ops = torch.ops.unlearn_ext
    torch.set_default_device(device)
    x, y = torch.randn(N, V), torch.randint(0, V, (N,))
    stats, grad_rows, grad = torch.zeros(N, 5), torch.ones(N), torch.empty(N, V)
    default = RowParams().scalars()  # the schemas' float[] params (csrc/common/row_args.h, set_params)

    def fwd(op="cross_entropy", logits=x, teacher=None, teacher2=None, labels=y, inv_t=1.0, alpha=0.0, gamma=0.0,
            params=None, **options):
        params = params or RowParams(IGNORE, inv_t, alpha, gamma, **options).scalars()
        return lambda: ops.row_loss_forward(op, logits, teacher, teacher2, labels, IGNORE, params)

    def fwd_grad(g, op="cross_entropy", logits=x, labels=y, scale=torch.ones(())):
        return lambda: ops.row_loss_forward_with_grad(op, logits, None, None, labels, IGNORE, default, g, scale)

    def bwd(st=stats, gr=grad_rows, g=grad, labels=y, op="cross_entropy", logits=x, teacher=None):
        return lambda: ops.row_loss_backward(op, logits, teacher, None, labels, st, gr, IGNORE, default, g)

    nan_row = x.clone()
    nan_row[1, 3] = float("nan")
    return [
        ("unknown op", "ValueError", ["unknown row op", "softmax"], fwd(op="softmax")),
        ("1-D logits", "ValueError", ["logits", "2-D or 3-D"], fwd(logits=x[0], labels=y[:1])),
        ("4-D logits", "ValueError", ["logits", "2-D or 3-D"], fwd(logits=x.reshape(1, 2, 2, V))),
        ("int logits", "TypeError", ["logits", "float32"], fwd(logits=x.long())),
        ("complex logits", "TypeError", ["logits", "float32"], fwd(logits=x.to(torch.complex64))),
        ("float8 logits", "TypeError", ["logits", "float32"], fwd(logits=x.to(torch.float8_e4m3fn))),
        ("strided vocab", "ValueError", ["logits", "unit stride"], fwd(logits=torch.randn(N, 2 * V)[:, ::2])),
        ("empty vocab", "ValueError", ["vocabulary"], fwd(logits=x[:, :0])),
        ("sparse logits", "NotImplementedError", ["Sparse"], fwd(logits=x.to_sparse())),
        ("teacher vocab mismatch", "ValueError", ["teacher", "shape"], fwd("forward_kl", teacher=torch.randn(N, V + 1),
                                                                            labels=None)),
        ("teacher 3-D vs 2-D", "ValueError", ["teacher", "shape"], fwd("forward_kl", teacher=x.reshape(2, 2, V),
                                                                        labels=None)),
        ("teacher missing", "ValueError", ["teacher", "missing"], fwd("forward_kl", labels=None)),
        ("teacher2 missing", "ValueError", ["teacher2", "missing"], fwd("rkld", teacher=x, labels=None)),
        ("teacher not taken", "ValueError", ["teacher", "given"], fwd(teacher=x)),
        ("int teacher", "TypeError", ["teacher", "float32"], fwd("forward_kl", teacher=x.long(), labels=None)),
        ("strided teacher", "ValueError", ["teacher", "unit stride"],
         fwd("forward_kl", teacher=torch.randn(N, 2 * V)[:, ::2], labels=None)),
        ("teacher on meta", "ValueError", ["teacher", "meta"], fwd("forward_kl", teacher=x.to("meta"), labels=None)),
        ("labels on meta", "ValueError", ["labels", "meta"], fwd(labels=y.to("meta"))),
        ("labels missing", "ValueError", ["needs labels"], fwd(labels=None)),
        ("undial labels missing", "ValueError", ["needs labels"], fwd("undial", teacher=x, labels=None)),
        ("int32 labels", "TypeError", ["labels", "int64"], fwd(labels=y.int())),
        ("labels count", "ValueError", ["labels", "one entry per row"], fwd(labels=y[:3])),
        ("label = V", "ValueError", ["label 10", "outside [0, 10)"], fwd(labels=torch.full((N,), V))),
        ("label negative", "ValueError", ["label -1", "outside"], fwd(labels=torch.full((N,), -1))),
        ("label 2^62", "ValueError", ["outside"], fwd(labels=torch.full((N,), 2**62))),
        ("temperature 0", "ValueError", ["temperature"], fwd(inv_t=0.0)),
        ("temperature negative", "ValueError", ["temperature"], fwd(inv_t=-1.0)),
        ("temperature NaN", "ValueError", ["temperature"], fwd(inv_t=float("nan"))),
        ("temperature inf", "ValueError", ["temperature"], fwd(inv_t=float("inf"))),
        ("alpha NaN", "ValueError", ["alpha", "finite"], fwd("rkld", teacher=x, teacher2=x, labels=None,
                                                            alpha=float("nan"))),
        ("gamma inf", "ValueError", ["gamma", "finite"], fwd("undial", teacher=x, gamma=float("inf"))),
        ("params too few", "ValueError", ["params", "7 numbers"], fwd(params=[1.0, 0.0, 0.0])),
        ("label_smoothing above 1", "ValueError", ["label_smoothing"], fwd(label_smoothing=1.5)),
        ("label_smoothing negative", "ValueError", ["label_smoothing"], fwd(label_smoothing=-0.1)),
        ("label_smoothing NaN", "ValueError", ["label_smoothing"], fwd(label_smoothing=float("nan"))),
        ("lse_square_scale negative", "ValueError", ["lse_square_scale"], fwd(lse_square_scale=-1e-4)),
        ("lse_square_scale inf", "ValueError", ["lse_square_scale"], fwd(lse_square_scale=float("inf"))),
        ("softcap negative", "ValueError", ["softcap"], fwd(softcap=-30.0)),
        ("softcap NaN", "ValueError", ["softcap"], fwd(softcap=float("nan"))),
        ("jsd beta 0", "ValueError", ["beta", "(0, 1)"], fwd("jsd", teacher=x, labels=None, beta=0.0)),
        ("jsd beta 1", "ValueError", ["beta", "(0, 1)"], fwd("jsd", teacher=x, labels=None, beta=1.0)),
        ("jsd beta NaN", "ValueError", ["beta"], fwd("jsd", teacher=x, labels=None, beta=float("nan"))),
        ("grad shape", "ValueError", ["grad", "shape"], fwd_grad(torch.empty(N, V + 1))),
        ("grad dtype", "TypeError", ["grad", "dtype"], fwd_grad(torch.empty(N, V, dtype=torch.float64))),
        ("grad strided", "ValueError", ["grad", "unit stride"], fwd_grad(torch.empty(N, 2 * V)[:, ::2])),
        ("grad expanded", "ValueError", ["grad", "share memory"], fwd_grad(torch.empty(1, V).expand(N, V))),
        ("grad rows overlap", "ValueError", ["grad", "share memory"],
         fwd_grad(torch.empty(N * V).as_strided((N, V), (1, 1)))),
        ("grad on meta", "ValueError", ["grad", "meta"], fwd_grad(torch.empty(N, V, device="meta"))),
        ("grad_scale two elements", "ValueError", ["grad_scale", "one element"], fwd_grad(grad, scale=torch.ones(2))),
        ("grad_scale int", "TypeError", ["grad_scale", "floating"], fwd_grad(grad, scale=torch.ones((), dtype=torch.long))),
        ("grad_scale on meta", "ValueError", ["grad_scale", "meta"], fwd_grad(grad, scale=torch.ones((), device="meta"))),
        ("stats rows", "ValueError", ["stats"], bwd(st=torch.zeros(N + 1, 5))),
        ("stats width", "ValueError", ["stats"], bwd(st=torch.zeros(N, 4))),
        ("stats dtype", "ValueError", ["stats"], bwd(st=torch.zeros(N, 5, dtype=torch.float64))),
        ("stats non-contiguous", "ValueError", ["stats", "contiguous"], bwd(st=torch.zeros(5, N).t())),
        ("stats 1-D", "ValueError", ["stats"], bwd(st=torch.zeros(N * 5))),
        ("stats on meta", "ValueError", ["stats", "meta"], bwd(st=torch.zeros(N, 5, device="meta"))),
        ("grad_rows count", "ValueError", ["grad_rows"], bwd(gr=torch.ones(N + 1))),
        ("grad_rows dtype", "ValueError", ["grad_rows"], bwd(gr=torch.ones(N, dtype=torch.float64))),
        ("grad_rows non-contiguous", "ValueError", ["grad_rows"], bwd(gr=torch.ones(2 * N)[::2])),
        ("backward grad expanded", "ValueError", ["grad", "share memory"], bwd(g=torch.empty(1, V).expand(N, V))),
        ("backward grad shape", "ValueError", ["grad", "shape"], bwd(g=torch.empty(N, V - 1))),
        ("backward label out of range", "ValueError", ["outside"], bwd(labels=torch.full((N,), V + 3))),
        ("backward teacher mismatch", "ValueError", ["teacher", "shape"],
         bwd(op="forward_kl", labels=None, teacher=torch.randn(N, V + 2))),
        # Legal edge inputs: no error, and no crash.
        ("empty batch", None, [], fwd(logits=x[:0], labels=y[:0])),
        ("empty 3-D batch", None, [], fwd(logits=torch.randn(2, 0, V), labels=torch.zeros(2, 0, dtype=torch.long))),
        ("NaN logits", None, [], fwd(logits=nan_row)),
        ("every row ignored", None, [], fwd(labels=torch.full((N,), IGNORE))),
        ("expanded logits (read only)", None, [], fwd(logits=torch.randn(1, V).expand(N, V))),
    ]


def _run_raw_cases(device):
    """Subprocess body: runs every raw case, one JSON line each; prints the case id first so
    that a crash names the case that caused it."""
    ue.backends()  # loads the extensions (and their op schemas)
    for case_id, _, _, call in raw_cases(device):
        print(json.dumps({"start": case_id}), flush=True)
        try:
            out = call()
            result = {"id": case_id, "exc": None, "nan_rows": _nan_rows(out)}
        except Exception as e:  # noqa: BLE001 - the test checks type and message
            result = {"id": case_id, "exc": type(e).__name__, "msg": str(e).split("\n")[0]}
        print(json.dumps(result), flush=True)


def _nan_rows(out):
    return [] if not isinstance(out, tuple) else torch.isnan(out[0]).nonzero().flatten().tolist()


# Devices with a C++ kernel here: the CPU always (a build without it fails below), CUDA
# when its extension runs.
RAW_DEVICES = ["cpu"] + (["cuda"] if ue.backends()["cuda"].available else [])


@pytest.fixture(scope="module", params=RAW_DEVICES)
def raw_results(request):
    if not ue.backends()["cpu"].available:
        pytest.fail("the C++ CPU extension is not built: " + ue.backends()["cpu"].detail)
    proc = subprocess.run([sys.executable, __file__, "--raw", request.param], capture_output=True, text=True,
                          timeout=300,
                          cwd=os.path.dirname(__file__), env={**os.environ, "UNLEARN_EXT_POISON": "1"})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    assert proc.returncode == 0, (f"the raw-op subprocess died (return code {proc.returncode}) during case "
                                  f"{started[-1] if started else None!r}:\n{proc.stderr[-3000:]}")
    return request.param, {line["id"]: line for line in lines if "id" in line}


RAW_CASES = [(case_id, exc, words) for case_id, exc, words, _ in raw_cases()]
LABEL_RANGE_CASES = {"label = V", "label negative", "label 2^62", "backward label out of range"}


@pytest.mark.parametrize("case_id, exc, words", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_op_refuses_bad_tensors(raw_results, case_id, exc, words):
    tally("bad inputs")
    device, results = raw_results
    result = results[case_id]
    if device != "cpu" and case_id in LABEL_RANGE_CASES and result["exc"] is None:
        # A GPU binding may leave label ranges to its kernel (no host synchronisation):
        # the kernel then writes NaN for the row, never reads out of bounds.
        assert case_id.startswith("backward") or result["nan_rows"] == list(range(N)), result
        return
    assert result["exc"] == exc, f"{case_id}: expected {exc}, got {result['exc']}: {result.get('msg')}"
    for word in words:
        assert word.lower() in result["msg"].lower(), f"{case_id}: {word!r} not in {result['msg']!r}"
    if case_id == "NaN logits":
        assert result["nan_rows"] == [1], "a NaN logit makes its own row NaN, and only that row"


# ---- public row ops (beyond row_op_suite.test_bad_inputs) -----------------------------------------

OPS = {
    # name: (call(logits, teachers, labels, **kw), teacher argument names)
    "token_logprob": (lambda x, t, y, **kw: ue.token_logprob(x, y, **kw), []),
    "cross_entropy": (lambda x, t, y, **kw: ue.cross_entropy(x, y, **kw), []),
    "forward_kl": (lambda x, t, y, **kw: ue.forward_kl(x, *t, y, **kw), ["teacher_logits"]),
    "reverse_kl": (lambda x, t, y, **kw: ue.reverse_kl(x, *t, y, **kw), ["teacher_logits"]),
    "rkld": (lambda x, t, y, **kw: ue.rkld(x, *t, y, **kw), ["original_logits", "augmented_logits"]),
    "undial": (lambda x, t, y, **kw: ue.undial(x, *t, y, **kw), ["teacher_logits"]),
    "jsd": (lambda x, t, y, **kw: ue.jsd(x, *t, y, **kw), ["teacher_logits"]),
}
BACKENDS = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in BACKEND_DEVICES]


def row_op_cases(op, device):
    call, teacher_names = OPS[op]
    x = torch.randn(N, V, device=device)
    y = torch.randint(0, V, (N,), device=device)
    teachers = [torch.randn(N, V, device=device) for _ in teacher_names]

    def with_teacher(k, bad):
        return [bad if j == k else t for j, t in enumerate(teachers)]

    cases = [
        (TypeError, ["logits", "dense"], lambda **kw: call(x.to_sparse(), teachers, y, **kw)),
        (TypeError, ["logits", "float32"], lambda **kw: call(x.bool(), teachers, y, **kw)),
        (TypeError, ["logits", "float32"], lambda **kw: call(x.to(torch.complex64), teachers, y, **kw)),
        (TypeError, ["logits", "Tensor"], lambda **kw: call(None, teachers, y, **kw)),
        (ValueError, ["logits", "[N, V]"], lambda **kw: call(x[0, 0], [t[0, 0] for t in teachers], y, **kw)),
        (TypeError, ["labels", "Tensor"], lambda **kw: call(x, teachers, y.tolist(), **kw)),
        (TypeError, ["labels", "integer"], lambda **kw: call(x, teachers, y.bool(), **kw)),
        (ValueError, ["labels", "shape"], lambda **kw: call(x, teachers, y.reshape(2, 2), **kw)),
        (ValueError, ["labels", "meta"], lambda **kw: call(x, teachers, y.to("meta"), **kw)),
        (ValueError, ["labels", "outside [0, 10)"], lambda **kw: call(x, teachers, torch.full_like(y, 2**40), **kw)),
        (TypeError, ["ignore_index", "int"], lambda **kw: call(x, teachers, y, ignore_index=-100.0, **kw)),
        (TypeError, ["temperature", "number"], lambda **kw: call(x, teachers, y, temperature="hot", **kw)),
        (ValueError, ["temperature", "positive"], lambda **kw: call(x, teachers, y, temperature=-1.0, **kw)),
        (ValueError, ["temperature", "finite"], lambda **kw: call(x, teachers, y, temperature=float("inf"), **kw)),
        (ValueError, ["reduction", "none"], lambda **kw: call(x, teachers, y, reduction=None, **kw)),
        (ValueError, ["backend", "torch, cpu, cuda, triton"], lambda **kw: call(x, teachers, y, **{**kw, "backend": 3})),
    ]
    for k, name in enumerate(teacher_names):
        cases += [
            (ValueError, [name, "shape"], lambda k=k, **kw: call(x, with_teacher(k, torch.randn(N, V + 1)), y, **kw)),
            (TypeError, [name, "Tensor"], lambda k=k, **kw: call(x, with_teacher(k, teachers[k].tolist()), y, **kw)),
            (TypeError, [name, "dense"], lambda k=k, **kw: call(x, with_teacher(k, teachers[k].to_sparse()), y, **kw)),
        ]
    if op == "rkld":
        cases += [(ValueError, ["alpha"], lambda **kw: call(x, teachers, y, alpha=float("nan"), **kw)),
                  (ValueError, ["alpha"], lambda **kw: call(x, teachers, y, alpha=float("inf"), **kw))]
    if op == "undial":
        cases += [(ValueError, ["gamma"], lambda **kw: call(x, teachers, y, gamma=float("inf"), **kw)),
                  (TypeError, ["gamma"], lambda **kw: call(x, teachers, y, gamma=None, **kw))]
    if op == "cross_entropy":
        cases += [(ValueError, ["label_smoothing", "[0, 1]"], lambda **kw: call(x, teachers, y, label_smoothing=1.1, **kw)),
                  (ValueError, ["label_smoothing", "[0, 1]"], lambda **kw: call(x, teachers, y, label_smoothing=-0.1, **kw)),
                  (ValueError, ["label_smoothing", "finite"],
                   lambda **kw: call(x, teachers, y, label_smoothing=float("nan"), **kw)),
                  (ValueError, ["lse_square_scale", "non-negative"],
                   lambda **kw: call(x, teachers, y, lse_square_scale=-1.0, **kw)),
                  (ValueError, ["lse_square_scale", "finite"],
                   lambda **kw: call(x, teachers, y, lse_square_scale=float("nan"), **kw)),
                  (TypeError, ["return_z_loss", "bool"], lambda **kw: call(x, teachers, y, return_z_loss=1, **kw))]
    if op == "jsd":
        cases += [(ValueError, ["beta", "[0, 1]"], lambda **kw: call(x, teachers, y, beta=1.5, **kw)),
                  (ValueError, ["beta", "[0, 1]"], lambda **kw: call(x, teachers, y, beta=-1e-9, **kw)),
                  (ValueError, ["beta", "finite"], lambda **kw: call(x, teachers, y, beta=float("nan"), **kw)),
                  (TypeError, ["beta", "number"], lambda **kw: call(x, teachers, y, beta="half", **kw))]
    # every row op takes Gemma-2's softcap
    cases += [(ValueError, ["softcap", "positive"], lambda **kw: call(x, teachers, y, softcap=0.0, **kw)),
              (ValueError, ["softcap", "positive"], lambda **kw: call(x, teachers, y, softcap=-30.0, **kw)),
              (ValueError, ["softcap", "finite"], lambda **kw: call(x, teachers, y, softcap=float("nan"), **kw)),
              (TypeError, ["softcap", "number"], lambda **kw: call(x, teachers, y, softcap=[30.0], **kw))]
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_row_op_bad_inputs(op, backend):
    for exc, words, call in row_op_cases(op, backend[1]):
        expect(exc, words, lambda: call(backend=backend[0]))


@pytest.mark.parametrize("op", list(OPS))
def test_module_bad_inputs(op):
    module_cls = getattr(ue, {"token_logprob": "TokenLogProb", "cross_entropy": "CrossEntropyLoss",
                              "forward_kl": "ForwardKLLoss", "reverse_kl": "ReverseKLLoss", "rkld": "RKLDLoss",
                              "undial": "UnDIALLoss", "jsd": "JSDLoss"}[op])
    _, teacher_names = OPS[op]
    x, y = torch.randn(N, V), torch.randint(0, V, (N,))
    teachers = [torch.randn(N, V) for _ in teacher_names]
    expect(ValueError, ["reduction"], lambda: module_cls(reduction="avg")(x, *teachers, y))
    expect(ValueError, ["temperature"], lambda: module_cls(temperature=0)(x, *teachers, y))
    expect(ValueError, ["backend"], lambda: module_cls(backend="tpu")(x, *teachers, y))
    expect(ValueError, ["labels"], lambda: module_cls()(x, *teachers, y[:2]))
    expect(TypeError, ["unexpected keyword", "margin"], lambda: module_cls(margin=1.0)(x, *teachers, y))


def test_backend_selection_bad_inputs(monkeypatch):
    x, y = torch.randn(N, V), torch.randint(0, V, (N,))
    monkeypatch.setenv("UNLEARN_EXT_BACKEND", "bogus")
    expect(ValueError, ["UNLEARN_EXT_BACKEND", "bogus"], lambda: ue.cross_entropy(x, y))
    monkeypatch.delenv("UNLEARN_EXT_BACKEND")
    # Meta tensors (shapes only) run the fake kernels on any backend (tests/test_no_host_sync.py);
    # mixed with real ones they are refused.
    assert ue.cross_entropy(x.to("meta"), y.to("meta"), backend="cpu").is_meta
    expect(ValueError, ["labels", "meta"], lambda: ue.cross_entropy(x.to("meta"), y, backend="cpu"))
    expect(ValueError, ["cpu backend takes CPU tensors", "cuda"],
           lambda: resolve("cpu", torch.device("cuda")))
    status = ue.backends()
    assert set(status) == {"torch", "cpu", "cuda", "triton"} and status["torch"].available
    for name in ("cuda", "triton"):
        if not status[name].available:
            expect(RuntimeError, [name, "not available", status[name].detail[:20]],
                   lambda name=name: ue.cross_entropy(x, y, backend=name))


# ---- sequence losses --------------------------------------------------------------------------------

def test_sequence_loss_bad_inputs():
    b, t = 2, 3
    x = torch.randn(b, t, V)
    y = torch.randint(0, V, (b, t))
    ref = torch.zeros(b)
    flat_x, flat_y = x.reshape(-1, V), y.reshape(-1)
    seq = torch.arange(b).repeat_interleave(t)
    cases = [
        (ValueError, ["beta", "positive"], lambda: ue.npo_loss(x, y, ref, beta=0.0)),
        (ValueError, ["beta", "positive"], lambda: ue.npo_loss(x, y, ref, beta=-0.1)),
        (ValueError, ["beta", "finite"], lambda: ue.npo_loss(x, y, ref, beta=float("nan"))),
        (TypeError, ["beta", "number"], lambda: ue.npo_loss(x, y, ref, beta=None)),
        (ValueError, ["ref_logprob", "shape"], lambda: ue.npo_loss(x, y, torch.zeros(b + 1))),
        (ValueError, ["ref_logprob"], lambda: ue.npo_loss(x, y, [0.0, 0.0])),
        (ValueError, ["ref_logprob", "meta"], lambda: ue.npo_loss(x, y, ref.to("meta"))),
        (ValueError, ["labels", "outside"], lambda: ue.npo_loss(x, torch.full_like(y, V), ref)),
        (ValueError, ["labels", "required"], lambda: ue.npo_loss(x, None, ref)),
        (ValueError, ["seq_index", "required"], lambda: ue.npo_loss(flat_x, flat_y, ref)),
        (TypeError, ["seq_index", "integer"], lambda: ue.npo_loss(flat_x, flat_y, ref, seq.float())),
        (ValueError, ["seq_index", "shape"], lambda: ue.npo_loss(flat_x, flat_y, ref, seq[:-1])),
        (ValueError, ["seq_index", "num_sequences"], lambda: ue.npo_loss(flat_x, flat_y, ref, seq, num_sequences=1)),
        (ValueError, ["num_sequences", "non-negative"], lambda: ue.npo_loss(flat_x, flat_y, ref, seq, num_sequences=-2)),
        (ValueError, ["seq_index", "meta"], lambda: ue.npo_loss(flat_x, flat_y, ref, seq.to("meta"))),
        (ValueError, ["beta", "positive"], lambda: ue.simnpo_loss(x, y, beta=0.0)),
        (ValueError, ["delta", "finite"], lambda: ue.simnpo_loss(x, y, delta=float("inf"))),
        (ValueError, ["forget_weight", "finite"],
         lambda: ue.graddiff_loss(x, y, x, y, forget_weight=float("nan"))),
        (ValueError, ["retain_weight", "finite"], lambda: ue.graddiff_loss(x, y, x, y, retain_weight=float("inf"))),
        (ValueError, ["teacher_logits", "shape"], lambda: ue.graddiff_loss(x, y, x, y, retain_ref_logits=x[:, :, :5])),
        (ValueError, ["retain_weight", "finite"], lambda: ue.npo_rt_loss(x, y, ref, x, y, retain_weight=float("nan"))),
        (ValueError, ["retain_weight", "finite"],
         lambda: ue.npo_kl_loss(x, y, ref, x, y, x, retain_weight=float("nan"))),
        (TypeError, ["logits", "float32"], lambda: ue.ga_loss(x.long(), y)),
        (ValueError, ["labels", "shape"], lambda: ue.sequence_logprob(x, y[:, :2])),
    ]
    for exc, words, call in cases:
        expect(exc, words, call)


# ---- legal but unusual inputs: correct results, no silent wrong numbers ------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_expanded_logits_with_inplace_backward_get_the_right_gradient(backend, reduction, seed):
    """Regression: an expanded logits tensor (rows sharing memory) with inplace_backward=True
    had every row's gradient written over the same memory. Such logits now get a buffer."""
    name, device = backend
    leaf = torch.randn(1, V, device=device, requires_grad=True)
    y = torch.randint(0, V, (N,), device=device)
    up = torch.randn(N, device=device)
    grads = []
    for inplace in (False, True):
        leaf.grad = None
        out = ue.cross_entropy((leaf * 1.0).expand(N, V), y, reduction=reduction, backend=name,
                               inplace_backward=inplace)
        ((out * up).sum() if reduction == "none" else out).backward()
        grads.append(leaf.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_a_fused_loss(backend, seed):
    """Regression: a loss whose gradient was written in the forward (reduction='sum'/'mean'
    on the CPU kernels) and scaled in place by a first backward failed a second backward
    (retain_graph=True) with a confusing autograd message. Same upstream of 1: works;
    a scaled one: a clear error."""
    name, device = backend
    x = torch.randn(N, V, device=device, requires_grad=True)
    y = torch.randint(0, V, (N,), device=device)
    loss = ue.cross_entropy(x, y, reduction="sum", backend=name)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * first)
    scaled = 2.0 * ue.cross_entropy(x, y, reduction="sum", backend=name)
    x.grad = None
    scaled.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * first)
    try:
        scaled.backward()
    except RuntimeError as e:  # the kernel backends that fuse the gradient into the forward
        assert "retain_graph" in str(e) and "reduction='none'" in str(e), str(e)
    else:
        torch.testing.assert_close(x.grad, 4 * first)


if __name__ == "__main__" and sys.argv[1:2] == ["--raw"]:
    _run_raw_cases(sys.argv[2])
