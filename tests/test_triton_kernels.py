"""What is particular to the Triton backend, beyond the shared suite (row_op_suite.py runs
every op on it: on CUDA, or under TRITON_INTERPRET=1 in the second pytest run of
`make test`):

- every kernel compiles for an H100 (sm_90) and an A100 (sm_80) with that device's block
  table, without register spills and with 64-bit row offsets, in the variant that aligned
  tensors run; the forward's row loop has no barrier or shuffle (per-lane maxima) and
  issues the next block's loads while it computes the current one: no GPU needed, so a
  kernel that only the interpreter accepts cannot land;
- the backend says why it cannot run (no GPU, no interpreter), refuses float64, reads
  mixed student/teacher dtypes, and turns a label it should never see into NaN, never
  into an out-of-bounds read.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import reference
from unlearn_ext.ops._row_loss import RowParams

import test_cross_entropy
import test_forward_kl
import test_reverse_kl
import test_rkld
import test_token_logprob
import test_undial
from conftest import KERNEL_BACKEND_DEVICES
from row_op_suite import OpSpec, assert_elementwise, make_inputs, run

triton = pytest.importorskip("triton", reason="Triton is not installed (it has no wheel for this platform)")

from unlearn_ext.triton_kernels import KERNELS  # noqa: E402
from unlearn_ext.triton_kernels.configs import gpu_config  # noqa: E402
from unlearn_ext.triton_kernels.launch import INTERPRETED  # noqa: E402
from unlearn_ext.triton_kernels.row_kernels import row_backward_kernel, row_forward_kernel  # noqa: E402
from unlearn_ext.triton_kernels.row_math import NEEDS_LABEL, OP_CODES  # noqa: E402

OPS = list(OP_CODES)
SPECS = {suite.spec.name: suite.spec for suite in (  # modules, not classes: pytest would collect them again
    test_token_logprob.TestTokenLogprob, test_cross_entropy.TestCrossEntropy, test_forward_kl.TestForwardKL,
    test_reverse_kl.TestReverseKL, test_rkld.TestRKLD, test_undial.TestUnDIAL)}
SPECS["jsd"] = OpSpec("jsd", teachers=1, labels_required=False)  # beta: RowParams' default, 0.5
TRITON = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in KERNEL_BACKEND_DEVICES if p[0] == "triton"] or [
    pytest.param(None, marks=pytest.mark.skip(reason="the triton backend cannot run in this process ("
                                              + ue.backends()["triton"].detail + "); `make test` runs these "
                                              "in its second, TRITON_INTERPRET=1 pass"))]


# ---- compiled for an H100 and an A100, without a GPU ------------------------------------------
H100, A100 = (9, 0), (8, 0)  # compute capabilities
VOCAB = 131072


# What Triton's launcher marks divisible by 16 (tt.divisibility) when the tensors are
# aligned, as contiguous [N, V] tensors from the allocator with V a multiple of 16 are:
# every pointer (GRAD_SCALE too: a one-element tensor from the allocator), each tensor's
# strides (0 counts: a 2-D tensor's outer one), and V.
ALIGNED = ("S", "T", "T2", "G", "LABELS", "VALUES", "STATS", "GRAD_ROWS", "GRAD_SCALE", "s_inner", "t_inner",
           "t2_inner", "g_inner", "s_outer", "t_outer", "t2_outer", "g_outer", "V")


_COMPILED = {}  # one compile per variant per process: the SASS test reuses the spill test's


def _compile(kernel, constexprs, num_warps, aligned, capability=H100):
    """The kernel compiled for that GPU (sm_90 by default): bf16 student and gradient,
    float32 teachers (mixed dtypes), int32 scalars as Triton passes them; `aligned`: the
    variant that aligned tensors run (ALIGNED divisible by 16), else the one that any
    tensor may run. constexprs must name every constexpr the launcher passes (SOFTCAP
    too: one left out would be compiled as a run-time argument, another variant)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"S": "*bf16", "T": "*fp32", "T2": "*fp32", "G": "*bf16", "LABELS": "*i64", "VALUES": "*fp32",
                "STATS": "*fp32", "GRAD_ROWS": "*fp32", "GRAD_SCALE": "*fp32"}
    floats = ("inv_t", "alpha", "gamma", "softcap", "smoothing", "smoothing_per_elem", "z_scale", "beta",
              "one_minus_beta")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
                 for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if aligned and name in ALIGNED and name not in constexprs}
    missing = [n for n in ("OP", "HAS_LABELS", "NEEDS_LABEL", "SOFTCAP", "BLOCK") if n not in constexprs]
    assert not missing, f"constexprs the launcher passes, missing: {missing}"
    arch = capability[0] * 10 + capability[1]
    key = (kernel.__name__, tuple(sorted(constexprs.items())), num_warps, aligned, arch)
    if key not in _COMPILED:
        _COMPILED[key] = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                        target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": num_warps, "enable_fp_fusion": True})
    return _COMPILED[key]


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _local_memory_bytes(cubin: bytes) -> int:
    """Bytes of local memory (register spills) per thread, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = re.findall(r"LOCAL:(\d+)", out)
    assert found, f"cuobjdump printed no resource usage: {out!r}"
    return max(int(x) for x in found)


def _sass_loops(cubin: bytes) -> list[list[str]]:
    """The instructions of each loop (a backward branch's target to the branch) of the
    cubin's SASS, in program order."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    instrs, labels, loops = [], {}, []
    for line in sass.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(instrs)
        elif m := re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            instrs.append(m.group(1))
            if (b := re.search(r"\bBRA\S*\s+`?\(?(\.L_x_\d+)", m.group(1))) and labels.get(b.group(1), 1 << 30) < len(instrs):
                loops.append(instrs[labels[b.group(1)]:])
    return loops


def _load_distances(loop: list[str]) -> list[int]:
    """For each 16-byte global load of a loop: instructions from its issue to the first that
    reads its destination registers, going round the loop (the next iteration's use)."""
    out = []
    for k, text in enumerate(loop):
        m = re.match(r"(?:@!?P\d+\s+)?LDG\S*\.128\s+R(\d+),", text)
        if not m:
            continue
        regs = [f"R{int(m.group(1)) + j}" for j in range(4)]
        for d in range(1, len(loop) + 1):
            sources = loop[(k + d) % len(loop)].split(",", 1)[1:]
            if sources and any(re.search(rf"\b{r}\b", sources[0]) for r in regs):
                out.append(d)
                break
    return out


# A load issued two blocks ahead is first read at least this many instructions later
# (74-513 in sm_90 SASS; the register moves of the rotation count as reads); one block
# ahead, the compiler issued them late in the block's math (24-218); a load issued where
# it is used is read within a few (the gradient loops: 11-26).
PREFETCH_DISTANCE = 64


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: the kernels are interpreted, there is nothing to compile")
@pytest.mark.parametrize("capability,aligned", [(H100, True), (H100, False), (A100, True)],
                         ids=["sm_90-aligned", "sm_90-unaligned", "sm_80-aligned"])
@pytest.mark.parametrize("op", OPS)
def test_kernels_compile_without_spills(op, aligned, capability):
    """Every kernel of the op in the variants the launcher runs (the softcap's on sm_90's
    aligned variant only: compiles are the cost of this test, minutes on 2 cores)."""
    common = dict(OP=OP_CODES[op], HAS_LABELS=True, NEEDS_LABEL=op in NEEDS_LABEL, SOFTCAP=False)
    block, warps = gpu_config("forward", op, VOCAB, capability)
    bblock, bwarps = gpu_config("backward", op, VOCAB, capability)
    assert block < VOCAB and bblock < VOCAB, "a whole-row block spills registers on large vocabularies"
    launches = [(row_forward_kernel, dict(common, WRITE_GRAD=False, BLOCK=block), warps),
                (row_forward_kernel, dict(common, WRITE_GRAD=True, BLOCK=block), warps),
                (row_backward_kernel, dict(common, BLOCK=bblock), bwarps)]
    if capability == H100 and aligned:
        launches.append((row_forward_kernel, dict(common, WRITE_GRAD=True, SOFTCAP=True, BLOCK=block), warps))
    for kernel, constexprs, num_warps in launches:
        compiled = _compile(kernel, constexprs, num_warps, aligned, capability)
        what = f"{kernel.__name__} {constexprs}"
        assert _local_memory_bytes(compiled.asm["cubin"]) == 0, f"{what} spills registers"
        # Row r starts at a 64-bit offset from each input's base (N * V may exceed 2^31).
        ttir = compiled.asm["ttir"]
        writes_grad = constexprs.get("WRITE_GRAD", True)
        for base in ["S"] + ["G"] * writes_grad + ["T"] * (SPECS[op].teachers >= 1) + ["T2"] * (op == "rkld"):
            name = f"(?:{base}|arg{kernel.arg_names.index(base)})"  # Triton < 3.6 numbers its arguments
            offsets = re.findall(rf"tt\.addptr %{name}, %\S+ : !tt\.ptr<\w+>, (\w+)", ttir)
            assert offsets and set(offsets) == {"i64"}, f"{what}: row offsets of {base} are {offsets}, not i64"
        if aligned:  # the hint reached the code: the student's blocks load as 16-byte vectors
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", compiled.asm["ptx"]), f"{what}: no 16-byte loads"


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: the kernels are interpreted, there is nothing to compile")
@pytest.mark.parametrize("op", OPS)
def test_forward_row_loop_has_no_barrier_and_prefetches(op):
    """The forward's first loop in the sm_90 SASS (pass 1 over the row, the variant aligned
    bf16 tensors run): no barrier and no shuffle inside it (per-lane maxima, merged after
    the loop), and every 16-byte load it issues (the next block's) is first read at least
    PREFETCH_DISTANCE instructions later: in flight while the current block's math runs."""
    block, warps = gpu_config("forward", op, VOCAB, H100)
    compiled = _compile(row_forward_kernel, dict(OP=OP_CODES[op], HAS_LABELS=True, NEEDS_LABEL=op in NEEDS_LABEL,
                                                 SOFTCAP=False, WRITE_GRAD=True, BLOCK=block), warps, True)
    loops = _sass_loops(compiled.asm["cubin"])
    row_loop = next(lp for lp in loops if any("LDG" in t for t in lp) and any("MUFU.EX2" in t for t in lp))
    assert not [t for t in row_loop if re.search(r"\bBAR\b|\bSHFL\b", t)], f"{op}: a barrier or shuffle in the row loop"
    distances = _load_distances(row_loop)
    assert distances and min(distances) >= PREFETCH_DISTANCE, \
        f"{op}: the row loop's loads are read {distances} instructions after their issue (of {len(row_loop)})"


# ---- backend behaviour ------------------------------------------------------------------------
def test_unavailable_without_gpu_or_interpreter_says_why():
    """On a machine without CUDA and without TRITON_INTERPRET=1 the backend reports itself
    unavailable with the reason, and naming it raises that reason."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import torch, unlearn_ext as ue\n"
            "print(ue.backends()['triton'])\n"
            "try:\n"
            "    ue.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('raised:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    status, raised = out.stdout.strip().splitlines()
    assert status.startswith("unavailable") and "CUDA" in status and "TRITON_INTERPRET" in status, status
    assert raised.startswith("raised:") and "triton" in raised and "TRITON_INTERPRET" in raised, raised


@pytest.mark.parametrize("backend", TRITON)
def test_float64_is_refused_naming_logits(backend):
    name, device = backend
    logits = torch.randn(3, 9, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="logits"):
        ue.cross_entropy(logits, torch.tensor([0, 1, 2], device=device), backend=name)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("op", ["forward_kl", "rkld", "undial"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=["bf16-student", "fp16-teacher"])
def test_mixed_student_and_teacher_dtypes(backend, op, dtypes, seed):
    """Teachers are converted to float32 on load, whatever their dtype and the student's."""
    name, device = backend
    spec = SPECS[op]
    logits, teachers, labels = make_inputs(spec, (5, 613), torch.float32, device)
    logits, teachers = logits.to(dtypes[0]), [t.to(dtypes[1]) for t in teachers]
    upstream = torch.randn(5, device=device)
    out, grad = run(lambda *a, **k: spec(*a, backend=name, **k), logits, teachers, labels, "none", upstream)
    ref_out, ref_grad = run(lambda x, t, y, **k: spec.reference(x, t, y), logits.double(),
                            [t.double() for t in teachers], labels, "none", upstream.double())
    assert grad.dtype == dtypes[0]
    assert_elementwise(out, ref_out, torch.float32, f"{op} {dtypes} value", atol=1e-4)
    assert_elementwise(grad, ref_grad, dtypes[0], f"{op} {dtypes} gradient", atol=1e-5)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("op", OPS)
def test_label_outside_the_vocabulary_gives_nan_in_its_row_only(backend, op, seed):
    """The Python layer refuses such labels; a kernel called directly must still not read
    out of bounds: ops that need the label give NaN in that row (value and gradient), the
    others only use labels to skip ignored rows."""
    name, device = backend
    spec = SPECS[op]
    logits, teachers, labels = make_inputs(spec, (4, 37), torch.float32, device, ignore_frac=0.0)
    labels[1] = 37
    labels[2] = -7
    teachers = teachers + [None] * (2 - len(teachers))
    params = RowParams(alpha=spec.params.get("alpha", 0.0), gamma=spec.params.get("gamma", 0.0))
    values, stats = KERNELS.forward(op, logits, *teachers, labels, params)
    grad = torch.full_like(logits, 7.0)
    KERNELS.backward(op, logits, *teachers, labels, stats, torch.ones(4, device=device), params, grad)
    bad = torch.tensor([False, True, True, False])
    if op in NEEDS_LABEL:
        assert torch.isnan(values[bad]).all() and torch.isnan(grad[bad]).all()
    else:
        assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    assert torch.isfinite(values[~bad]).all() and torch.isfinite(grad[~bad]).all()
    expected = reference.ROW_OPS[op](logits[~bad].double(), *[t[~bad].double() for t in teachers if t is not None],
                                     labels[~bad], **spec.params)
    torch.testing.assert_close(values[~bad].double(), expected, rtol=2e-5, atol=1e-5)
