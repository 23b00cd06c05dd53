"""The CUDA kernels' per-thread code, run on the CPU.

tests/cuda_emulator.cpp compiles csrc/cuda/row_thread.h (everything a CUDA thread does
between barriers) and the launch configuration with the host compiler and runs a block
thread after thread. Plugged into the op layer as a backend, it faces the same oracle and
bounds as every backend (row_op_suite.check_against_reference), on the paths where GPU
kernels go wrong: 16-byte vectors against unaligned rows, tiles walked forwards then in
reverse, the cached last tile, in-place gradients, mixed dtypes, float64. What it cannot
check (the block merge's shuffles and barriers, the intrinsics) is reviewed in
row_kernels.cu and run by tests/test_cuda_kernels.py on a GPU.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unlearn_ext.ops import _row_loss
from row_op_suite import IGNORE, OpSpec, assert_elementwise, check_against_reference, make_inputs, run

ROOT = Path(__file__).resolve().parent.parent
KERNEL_OPS = ["token_logprob", "cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial", "jsd"]  # kOpNames order
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
PATHS = {0: "float32", 1: "bfloat16", 2: "float16", 3: "scalar"}
SPECS = {
    "token_logprob": OpSpec("token_logprob", teachers=0, labels_required=True),
    "cross_entropy": OpSpec("cross_entropy", teachers=0, labels_required=True),
    "forward_kl": OpSpec("forward_kl", teachers=1, labels_required=False),
    "reverse_kl": OpSpec("reverse_kl", teachers=1, labels_required=False),
    "rkld": OpSpec("rkld", teachers=2, labels_required=False, params={"alpha": 8.0}),
    "undial": OpSpec("undial", teachers=1, labels_required=True, params={"gamma": 10.0}),
    "jsd": OpSpec("jsd", teachers=1, labels_required=False, params={"beta": 0.3}),
    # the options of issue 12: label smoothing, z-loss and softcap together; softcap on a KL
    "cross_entropy+options": OpSpec("cross_entropy", teachers=0, labels_required=True,
                                    params={"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 5.0}),
    "reverse_kl+softcap": OpSpec("reverse_kl", teachers=1, labels_required=False, params={"softcap": 4.0}),
}
OPS = list(SPECS)  # the cases below: every kernel op, and the options
NAME = "cuda_emulated"


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"needs a C++ compiler to build the emulator ({cxx} not found)")
    out = tmp_path_factory.mktemp("cuda_emulator") / "libue_cuda_emulator.so"
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(out),
                    str(ROOT / "tests" / "cuda_emulator.cpp")], check=True)
    lib = ctypes.CDLL(str(out))
    i64, f64, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.ue_args_new.restype = ptr
    lib.ue_args_free.argtypes = [ptr]
    lib.ue_args_set.argtypes = [ptr, i32, i64, i64, ptr, i64, ctypes.POINTER(f64)]
    lib.ue_args_set_view.argtypes = [ptr, i32, ptr, i32, i64, i64, i64]
    lib.ue_args_set_outputs.argtypes = [ptr, ptr, ptr, ptr, i32, f64]
    lib.ue_launch_config.argtypes = [ptr, i32, i32, i64, ctypes.POINTER(i64)]
    lib.ue_stage_limit.argtypes = [i64, i64]
    lib.ue_stage_limit.restype = i64
    lib.ue_run.argtypes = [ptr, i32, i32, i64, i32]
    lib.ue_plan.argtypes = [ptr, i64, i32, ctypes.POINTER(i64)]
    return lib


def _view(t: torch.Tensor):
    """(inner_rows, inner_stride, outer_stride) as csrc/torch_row_args.h's to_row_view."""
    if t.dim() == 2:
        return max(t.size(0), 1), t.stride(0), 0
    return max(t.size(1), 1), t.stride(1), t.stride(0)


def _new_output(shape, dtype):
    if os.environ.get("UNLEARN_EXT_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


class Args:
    """A RowArgs on the C side, holding the tensors it points into."""

    def __init__(self, lib, op, logits, teacher=None, teacher2=None, labels=None, ignore_index=IGNORE, **scalars):
        """scalars: RowParams' fields (inv_temperature, alpha, gamma, ...), or params=RowParams."""
        self.lib, self.ptr = lib, lib.ue_args_new()
        self.keep = [logits, teacher, teacher2]
        self.labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
        vocab = logits.shape[-1]
        self.rows = logits.numel() // vocab
        params = scalars.pop("params", None) or _row_loss.RowParams(ignore_index, **scalars)
        values = params.scalars()
        lib.ue_args_set(self.ptr, KERNEL_OPS.index(op), self.rows, vocab,
                        None if self.labels is None else self.labels.data_ptr(), ignore_index,
                        (ctypes.c_double * len(values))(*values))
        for which, t in enumerate([logits, teacher, teacher2]):
            if t is not None:
                self.set_view(which, t)

    def set_view(self, which, t):
        self.keep.append(t)
        self.lib.ue_args_set_view(self.ptr, which, t.data_ptr(), DTYPE_CODES[t.dtype], *_view(t))

    def set_outputs(self, values=None, stats=None, grad_rows=None, write_grad=False, grad_scale=1.0):
        self.keep += [values, stats, grad_rows]
        ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
        self.lib.ue_args_set_outputs(self.ptr, ptr(values), ptr(stats), ptr(grad_rows), int(write_grad), grad_scale)

    def __del__(self):
        self.lib.ue_args_free(self.ptr)


# The stage a block may take on an H200 (sm_90: 228 KB of shared memory per multiprocessor,
# 227 KB per block at most), as the launcher reads it off the device.
H200_STAGE = 233_472 // 2 - 1024 - 1280


class EmulatedKernels:
    """The kernel-object interface of unlearn_ext._backends (TorchOpKernels) over the emulator.
    stage_limit: the on-chip stage a block may take (the H200's by default; 0: never staged).
    poison: inputs' vectors overwritten with NaN after each row's pass 1 (see cuda_emulator.cpp)."""

    def __init__(self, lib, fuses_grad: bool, threads: int = 0, stage_limit: int = H200_STAGE,
                 poison: bool = False):
        self.lib, self.name, self.fuses_grad, self.threads = lib, NAME, fuses_grad, threads
        self.stage_limit, self.poison = stage_limit, poison

    def _args(self, op, logits, teacher, teacher2, labels, p):
        return Args(self.lib, op, logits, teacher, teacher2, labels, p.ignore_index, params=p)

    def forward(self, op, logits, teacher, teacher2, labels, p, grad=None, grad_scale=1.0):
        a = self._args(op, logits, teacher, teacher2, labels, p)
        cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        values, stats = _new_output((a.rows,), cdt), _new_output((a.rows, 5), cdt)
        if grad is not None:
            a.set_view(3, grad)
        a.set_outputs(values, stats, write_grad=grad is not None, grad_scale=grad_scale)
        assert self.lib.ue_run(a.ptr, 1, self.threads, self.stage_limit, int(self.poison)) == 0
        return values, stats

    def forward_with_grad(self, op, logits, teacher, teacher2, labels, p, grad, grad_scale):
        return self.forward(op, logits, teacher, teacher2, labels, p, grad, grad_scale)

    def backward(self, op, logits, teacher, teacher2, labels, stats, grad_rows, p, grad):
        a = self._args(op, logits, teacher, teacher2, labels, p)
        a.set_view(3, grad)
        a.set_outputs(stats=stats, grad_rows=grad_rows)
        assert self.lib.ue_run(a.ptr, 0, self.threads, 0, 0) == 0


@pytest.fixture
def emulate(lib, monkeypatch):
    """emulate(fuses_grad, threads, stage_limit, poison) makes backend=NAME run the emulated
    CUDA kernels."""
    real_resolve, real_kernels = _row_loss.resolve, _row_loss._kernels

    def use(fuses_grad=True, threads=0, stage_limit=H200_STAGE, poison=False):
        k = EmulatedKernels(lib, fuses_grad, threads, stage_limit, poison)
        monkeypatch.setattr(_row_loss, "resolve", lambda b, d: k if b == NAME else real_resolve(b, d))
        monkeypatch.setattr(_row_loss, "_kernels", lambda n: k if n == NAME else real_kernels(n))
        return (NAME, "cpu")

    return use


# ---- against the reference, through the op layer ---------------------------------------

# The longest rows in bfloat16 only: the emulator is slow, and the dtypes differ only in
# their conversions, which the short rows cover.
CASES = [(shape, dtype) for shape in [(3, 1), (5, 7), (16, 1271)]
         for dtype in [torch.float32, torch.bfloat16, torch.float16]] + [((4, 32003), torch.bfloat16)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
@pytest.mark.parametrize("mode", ["none", "mean-fused", "sum-unfused"])
def test_matches_reference(emulate, op, shape, dtype, mode, seed):
    reduction = mode.split("-")[0]
    backend = emulate(fuses_grad=mode.endswith("-fused"))
    check_against_reference(SPECS[op], backend, shape, dtype, reduction)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("threads", [32, 64])
@pytest.mark.parametrize("vocab", [1271, 4099])
@pytest.mark.parametrize("path", ["on_chip", "l2"])
def test_many_tiles_per_row(emulate, op, threads, vocab, path, seed):
    """Few threads: rows span several tiles, so pass 2 walks them in reverse and reuses the
    cached one; the unroll leaves partial tiles. on_chip: pass 1 stages the row and pass 2
    reads it from the stage; l2: no stage, pass 2 re-reads the row."""
    backend = emulate(fuses_grad=True, threads=threads, stage_limit=H200_STAGE if path == "on_chip" else 0)
    check_against_reference(SPECS[op], backend, (6, vocab), torch.bfloat16, "mean")
    check_against_reference(SPECS[op], backend, (6, vocab), torch.float32, "sum")


@pytest.mark.parametrize("op", KERNEL_OPS)
@pytest.mark.parametrize("vocab", ["on_chip", "l2"])
def test_launcher_blocks_on_either_side_of_the_stage(emulate, op, vocab, seed):
    """The launcher's own block size (512 threads) on the vocabularies of
    tests/test_cuda_kernels.py's on-chip and L2 cases (the first GPU stage runs those)."""
    spec = SPECS[op]
    v = {"on_chip": {0: 24001, 1: 12001, 2: 9001}, "l2": {0: 60001, 1: 30001, 2: 20001}}[vocab][spec.teachers]
    check_against_reference(spec, emulate(fuses_grad=True), (3, v), torch.bfloat16, "mean")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["aligned", "misaligned_base"])
def test_on_chip_rows_are_not_reread_from_memory(emulate, op, layout, seed):
    """The on-chip path's promise: once pass 1 of a row is over, the passes after it (the
    gradient, JSD's second sum) read nothing of its vectors from memory. The emulator
    overwrites them with NaN after pass 1: values and gradients must still match the
    reference (computed on a copy). The same rows without a stage re-read them: NaN shows
    up, so the check can fail."""
    spec = SPECS[op]
    logits, teachers, labels = make_inputs(spec, (4, 3002), torch.bfloat16, "cpu", ignore_frac=0.0)
    view = (lambda x: x[:, 1:]) if layout == "misaligned_base" else (lambda x: x[:, :-1])  # noqa: E731
    v, tv, labels = view(logits), [view(t) for t in teachers], labels % 3001
    ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), v.double(), [t.double() for t in tv],
                            labels, "mean", None)
    for staged in (True, False):
        backend = emulate(fuses_grad=True, threads=32, stage_limit=H200_STAGE if staged else 0, poison=True)
        out, grad = run(lambda *a, **k: spec(*a, backend=backend[0], **k), v.clone(), [t.clone() for t in tv],
                        labels, "mean", None)
        if staged:
            assert_elementwise(out, ref_out, torch.float32, "value", atol=1e-5)
            assert_elementwise(grad, ref_grad, torch.bfloat16, "gradient", atol=1e-6)
        else:
            assert not torch.isfinite(grad).all(), "without a stage pass 2 re-reads the (poisoned) row"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", ["huge", "masked_rows", "masked_vocab", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_values(emulate, op, case, dtype, seed):
    kw = {"huge": dict(scale=1e4), "masked_rows": dict(mask="rows"), "masked_vocab": dict(mask="vocab"),
          "peaked": dict(peaked=True)}[case]
    check_against_reference(SPECS[op], emulate(), (8, 613), dtype, "none", **kw)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(emulate, op, temperature, seed):
    check_against_reference(SPECS[op], emulate(), (6, 1031), torch.bfloat16, "mean", temperature=temperature)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("ignore_frac", [0.0, 1.0], ids=["none", "all"])
@pytest.mark.parametrize("fused", [True, False])
def test_ignored_rows(emulate, op, ignore_frac, fused, seed):
    out, grad = check_against_reference(SPECS[op], emulate(fused), (12, 257), torch.bfloat16, "mean",
                                        ignore_frac=ignore_frac)
    if ignore_frac == 1.0:
        assert out.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float64_runs_the_scalar_path_in_double(emulate, op, reduction, seed):
    spec, backend = SPECS[op], emulate()
    logits, teachers, labels = make_inputs(spec, (5, 301), torch.float64, "cpu")
    upstream = torch.randn(5, dtype=torch.float64)
    out, grad = run(lambda *a, **k: spec(*a, backend=backend[0], **k), logits, teachers, labels, reduction, upstream)
    ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), logits, teachers, labels, reduction,
                            upstream)
    assert out.dtype == grad.dtype == torch.float64
    assert_elementwise(out, ref_out, torch.float64, "value", atol=1e-13)
    assert_elementwise(grad, ref_grad, torch.float64, "gradient", atol=1e-15)


# ---- layouts: vectorised, peeled, scalar ------------------------------------------------

LAYOUTS = ["shifted_3d", "row_strided", "misaligned_base", "odd_row_stride", "mixed_dtype", "teacher_other_stride"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fused", [True, False])
def test_layouts(emulate, op, layout, fused, seed):
    """Rows whose starts are not 16-byte aligned: a peeled head when every tensor shares
    the misalignment, else element by element; a teacher of another dtype."""
    spec, backend = SPECS[op], emulate(fused, threads=32)
    full = {"shifted_3d": (2, 6, 203), "row_strided": (6, 300), "misaligned_base": (6, 260),
            "odd_row_stride": (6, 251), "mixed_dtype": (6, 256), "teacher_other_stride": (6, 253)}[layout]
    logits, teachers, labels = make_inputs(spec, full, torch.bfloat16, "cpu")
    if layout == "shifted_3d":
        view, labels = (lambda x: x[:, :-1]), labels[:, 1:]
    elif layout == "row_strided":
        view = lambda x: x[:, 3:211]  # noqa: E731
    elif layout == "misaligned_base":
        view = lambda x: x[:, 1:]  # noqa: E731
    else:
        view = lambda x: x  # noqa: E731
    v, tv = view(logits), [view(t) for t in teachers]
    if layout == "mixed_dtype":
        tv = [t.float() for t in tv]
    if layout == "teacher_other_stride":  # rows of V = 253 bf16: misaligned differently than a padded copy
        tv = [torch.nn.functional.pad(t, (0, 3))[:, :253] for t in tv]
    if layout in ("row_strided", "misaligned_base"):
        labels = torch.where(labels == IGNORE, labels, labels % v.shape[-1])
    upstream = torch.randn(v.shape[:-1])
    reduction = "mean" if fused else "none"
    out, grad = run(lambda *a, **k: spec(*a, backend=backend[0], **k), v, tv, labels, reduction, upstream)
    ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), v.double(), [t.double() for t in tv],
                            labels, reduction, upstream.double())
    assert_elementwise(out, ref_out, torch.float32, f"{layout} value", atol=1e-5)
    assert_elementwise(grad, ref_grad, torch.bfloat16, f"{layout} gradient", atol=1e-6)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inplace_gradient_over_shifted_view(emulate, op, reduction, seed):
    """The gradient written over logits[:, :-1] of a [B, T, V] buffer, fused or not."""
    spec, backend = SPECS[op], emulate(fuses_grad=True, threads=32)
    logits, teachers, labels = make_inputs(spec, (2, 5, 333), torch.bfloat16, "cpu")
    labels = labels[:, 1:]
    upstream = torch.randn(2, 4)
    tv = [t[:, :-1] for t in teachers]
    expected_out, expected_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), logits[:, :-1].double(),
                                      [t.double() for t in tv], labels, reduction, upstream.double())
    leaf = logits.clone().requires_grad_(True)
    buffer = leaf * 1.0
    out = spec(buffer[:, :-1], tv, labels, backend=backend[0], reduction=reduction, inplace_backward=True)
    (out * upstream).sum().backward() if reduction == "none" else out.backward()
    assert_elementwise(out.detach(), expected_out, torch.float32, "value", atol=1e-5)
    assert_elementwise(leaf.grad[:, :-1], expected_grad, torch.bfloat16, "gradient", atol=1e-6)
    assert torch.equal(buffer.detach()[:, :-1], leaf.grad[:, :-1]), "the gradient was written over the logits"
    assert torch.equal(buffer.detach()[:, -1], logits[:, -1]), "the position outside the view is untouched"


@pytest.mark.parametrize("op", OPS)
def test_nan_stays_in_its_row(emulate, op, seed):
    spec, backend = SPECS[op], emulate()
    logits, teachers, labels = make_inputs(spec, (4, 300), torch.bfloat16, "cpu", ignore_frac=0.0)
    logits[1, 7] = float("nan")
    out = spec(logits, teachers, labels, backend=backend[0], reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("op", ["token_logprob", "cross_entropy", "undial"])
@pytest.mark.parametrize("forward", [True, False])
def test_invalid_label_gives_nan_not_a_read(lib, op, forward):
    """Direct calls skip the Python checks: a needed label outside [0, V) gives NaN."""
    spec = SPECS[op]
    logits, teachers, _ = make_inputs(spec, (3, 40), torch.float32, "cpu", ignore_frac=0.0)
    labels = torch.tensor([5, 40, -7])
    a = Args(lib, op, logits, *teachers, *([None] * (2 - len(teachers))), labels=labels, gamma=3.0)
    values, stats = torch.zeros(3), torch.zeros(3, 5)
    grad = torch.zeros_like(logits)
    a.set_view(3, grad)
    a.set_outputs(values, stats, grad_rows=torch.ones(3), write_grad=forward)
    if not forward:
        assert lib.ue_run(a.ptr, 1, 0, 0, 0) == 0  # stats first
        a.set_outputs(values, stats, grad_rows=torch.ones(3))
    assert lib.ue_run(a.ptr, int(forward), 0, H200_STAGE, 0) == 0
    if forward:
        assert torch.isfinite(values[0]) and torch.isnan(values[1:]).all()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


# ---- the launcher's host-side choices -----------------------------------------------------

def _config(lib, op, logits, teachers=(), uses_grad=True, grad=None, forward=True, stage_limit=0):
    a = Args(lib, op, logits, *teachers, *([None] * (2 - len(teachers))), labels=None)
    a.set_view(3, logits if grad is None else grad)
    out = (ctypes.c_int64 * 3)()
    threads = lib.ue_launch_config(a.ptr, int(uses_grad), int(forward), stage_limit, out)
    return (threads, PATHS[out[0]], bool(out[1])) + ((out[2],) if stage_limit else ())


def test_launch_config_paths_and_block_sizes(lib):
    bf = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    # at most 512 threads: two rows stream per multiprocessor at every vocabulary size
    assert _config(lib, "cross_entropy", bf(4, 32000)) == (512, "bfloat16", False)
    assert _config(lib, "cross_entropy", bf(4, 128256)) == (512, "bfloat16", False)
    assert _config(lib, "cross_entropy", bf(4, 262144)) == (512, "bfloat16", False)
    assert _config(lib, "cross_entropy", torch.empty(4, 7)) == (32, "float32", False)
    assert _config(lib, "reverse_kl", bf(4, 32000), [bf(4, 32000)]) == (512, "bfloat16", False)
    assert _config(lib, "rkld", bf(4, 32000), [bf(4, 32000)] * 2) == (512, "bfloat16", False)
    assert _config(lib, "forward_kl", torch.empty(4, 1000, dtype=torch.float16),
                   [torch.empty(4, 1000, dtype=torch.float16)]) == (64, "float16", False)
    # mixed dtypes and float64 go element by element
    assert _config(lib, "reverse_kl", bf(4, 32000), [torch.empty(4, 32000)])[1:] == ("scalar", False)
    assert _config(lib, "cross_entropy", torch.empty(4, 100, dtype=torch.float64))[1:] == ("scalar", True)
    # a forward without gradient ignores the grad view
    assert _config(lib, "cross_entropy", bf(4, 64), uses_grad=False, grad=torch.empty(4, 64))[1] == "bfloat16"


def test_stage_limit_and_which_rows_go_on_chip(lib):
    """The stage one block may take: two blocks per multiprocessor (row_dispatch.h,
    stage_limit): 112 KB on sm_90 (228 KB per SM), 80 KB on sm_80 (164 KB). The rows that
    take the on-chip path: a forward with a gradient or JSD, every input's vectors within it."""
    assert lib.ue_stage_limit(233472, 232448) == H200_STAGE == 114432
    assert lib.ue_stage_limit(167936, 166912) == 81664
    bf = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    on_chip = lambda *a, **k: _config(lib, *a, stage_limit=H200_STAGE, **k)[3]  # noqa: E731
    assert on_chip("cross_entropy", bf(4, 49152)) == 49152 * 2  # SmolLM2's vocabulary
    assert on_chip("cross_entropy", bf(4, 57216)) == 57216 * 2  # the longest bf16 row of one input
    assert on_chip("cross_entropy", bf(4, 57224)) == 0
    assert on_chip("cross_entropy", torch.empty(4, 28608)) == 28608 * 4
    assert on_chip("reverse_kl", bf(4, 28608), [bf(4, 28608)]) == 2 * 28608 * 2
    assert on_chip("reverse_kl", bf(4, 32000), [bf(4, 32000)]) == 0  # two inputs of 64 KB: L2
    assert on_chip("rkld", bf(4, 16000), [bf(4, 16000)] * 2) == 3 * 16000 * 2
    assert on_chip("cross_entropy", bf(4, 128256)) == 0
    assert on_chip("cross_entropy", bf(4, 32000), uses_grad=False) == 0  # no second pass
    assert on_chip("jsd", bf(4, 16000), [bf(4, 16000)], uses_grad=False) == 2 * 16000 * 2
    assert on_chip("cross_entropy", bf(4, 32000), forward=False) == 0  # the backward reads once
    assert on_chip("cross_entropy", torch.empty(4, 1000, dtype=torch.float64)) == 0  # no vectors


def _plan(lib, op, logits, teachers=(), grad=None, row=0):
    a = Args(lib, op, logits, *teachers, *([None] * (2 - len(teachers))))
    if grad is not None:
        a.set_view(3, grad)
    out = (ctypes.c_int64 * 2)()
    lib.ue_plan(a.ptr, row, int(grad is not None), out)
    return out[0], out[1]  # vec_begin, nvec


def test_rows_are_vectorised_from_their_first_aligned_element(lib):
    x = torch.empty(4, 32000, dtype=torch.bfloat16)
    assert _plan(lib, "cross_entropy", x, row=3) == (0, 4000)
    assert _plan(lib, "cross_entropy", x[:, 1:], row=0) == (7, 3999)  # 2 bytes past a boundary
    assert _plan(lib, "cross_entropy", x[:, 1:], grad=torch.empty(4, 31999, dtype=torch.bfloat16)) == (0, 0)
    t = torch.empty(4, 32000, dtype=torch.bfloat16)
    assert _plan(lib, "forward_kl", x[:, 1:], [t[:, 1:]], row=2) == (7, 3999)
    assert _plan(lib, "forward_kl", x[:, 1:], [t[:, :-1]], row=2) == (0, 0)  # differently misaligned
    y = torch.empty(3, 1003)  # odd float32 rows: row 1 starts 12 bytes past a boundary
    assert _plan(lib, "cross_entropy", y, row=1) == (1, 250)
    assert _plan(lib, "cross_entropy", torch.empty(2, 3), row=1) == (1, 0)  # shorter than one vector
