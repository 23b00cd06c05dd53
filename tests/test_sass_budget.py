"""The CUDA kernels' hot loops stay within the H200's instruction budget: the SASS of every
op x dtype (bf16, fp16, fp32) compiled for sm_90, loops found in the machine code, their
instructions per element against the budget at 4.3 TB/s (benchmarks/sass_budget.py says
how it is derived). A static property of the compiled code, not a timing: no GPU needed,
only nvcc and nvdisasm (the toolkit's or the one in Triton's wheel); skipped without them."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import sass_budget  # noqa: E402

NVCC, NVDISASM = sass_budget.find_tool("nvcc"), sass_budget.find_tool("nvdisasm")
pytestmark = pytest.mark.skipif(not (NVCC and NVDISASM), reason="needs nvcc and nvdisasm (CUDA toolkit or Triton)")


@pytest.fixture(scope="module")
def loops():
    return sass_budget.analyse(sass_budget.cubin(NVCC), NVDISASM)


# The loops each kernel variant must have (sass_budget.VARIANTS): the forward's pass 1, the
# fused forward's pass 1 and gradient pass (from L2, or staged in and read from shared
# memory: the on-chip path), the backward's loop.
EXPECTED = {"forward": ("pass1",), "fused": ("pass1", "fused_grad"),
            "fused_onchip": ("pass1_staged", "fused_grad_onchip"), "backward": ("backward",)}


def test_every_variant_has_its_hot_loops(loops):
    """The analysis finds what it is meant to check: for every op, vector dtype and kernel
    variant (write_grad and the on-chip stage are template parameters), each of its loops
    as one basic block (the plain losses' loops: the count is exact, that of the path every
    long row takes)."""
    found = {(lp.op, lp.dtype, lp.kernel, lp.kind) for lp in loops if lp.exact}
    for op in sass_budget.OPS:
        for dtype in ("float32", "bfloat16", "float16"):
            for variant, kinds in EXPECTED.items():
                for kind in kinds:
                    assert (op, dtype, variant, kind) in found, \
                        f"no {kind} loop of one basic block found in the {variant} kernel of {op} {dtype}"


def test_hot_loops_within_budget(loops):
    """Pass 1 of every forward variant within the budget of the inputs it reads (the stage's
    shared-memory stores move no HBM bytes), the separate backward within that of the
    inputs it reads and the gradient it writes. (The fused gradient passes re-read the
    row from L2 or shared memory and write the gradient: their share is checked with pass
    1 in the next test. The general code, for a softcap, label smoothing, z-loss or JSD, is
    not budgeted.)"""
    over = [f"{lp.op} {lp.dtype} {lp.kernel} {lp.kind}: {lp.per_element:.1f} > {lp.budget:.1f} instructions per "
            f"element" for lp in loops if lp.exact and not lp.kind.startswith("fused_grad") and
            lp.per_element > lp.budget]
    assert not over, "over the H200 budget:\n" + "\n".join(over)


def test_fused_forward_within_the_floor_budget(loops):
    """Pass 1 + the gradient pass of each fused forward (pass 2 from L2, and the on-chip
    path) within the budget of the bytes it moves (the floor): the inputs read once, the
    gradient written once."""
    totals = sass_budget.fused_totals(loops)
    assert {k[0] for k in totals} == {"fused", "fused_onchip"}
    over = [f"{variant} {op} {dtype}: {v['total']:.1f} > {v['budget']:.1f}"
            for (variant, op, dtype), v in totals.items() if v["total"] > v["budget"]]
    assert not over, "fused forward over the H200 budget:\n" + "\n".join(over)


def test_no_register_spills_in_hot_loops(loops):
    """No local-memory access (ptxas's register spills, LDL/STL) inside any hot loop of the
    plain losses: a spill there would add memory traffic per element. (ptxas still reports
    a few bytes of spills in some variants, outside these loops: once per row.)"""
    spilling = [f"{lp.op} {lp.dtype} {lp.kernel} {lp.kind}: {lp.local} local accesses per iteration"
                for lp in loops if lp.exact and lp.local]
    assert not spilling, "register spills inside hot loops:\n" + "\n".join(spilling)
