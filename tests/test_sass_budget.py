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


def test_every_variant_has_its_hot_loops(loops):
    """The analysis finds what it is meant to check: for every op and vector dtype, the
    forward's pass 1 and gradient pass and the backward's loop as one basic block each (the
    plain losses' loops: the count is exact, that of the path every long row takes)."""
    found = {(lp.op, lp.dtype, lp.kind) for lp in loops if lp.exact}
    for op in sass_budget.OPS:
        for dtype in ("float32", "bfloat16", "float16"):
            for kind in ("pass1", "fused_grad", "backward"):
                assert (op, dtype, kind) in found, f"no {kind} loop of one basic block found for {op} {dtype}"


def test_hot_loops_within_budget(loops):
    """Pass 1 of the forward within the budget of the inputs it reads, the separate backward
    within that of the inputs it reads and the gradient it writes. (The fused gradient
    pass re-reads the row from L2 and writes the gradient: its share is checked with pass 1
    in the next test. The general code, for a softcap, label smoothing, z-loss or JSD, is
    not budgeted.)"""
    over = [f"{lp.op} {lp.dtype} {lp.kind}: {lp.per_element:.1f} > {lp.budget:.1f} instructions per element"
            for lp in loops if lp.exact and lp.kind != "fused_grad" and lp.per_element > lp.budget]
    assert not over, "over the H200 budget:\n" + "\n".join(over)


def test_fused_forward_within_the_floor_budget(loops):
    """Pass 1 + the gradient pass of the fused forward within the budget of the bytes it
    moves (the floor): the inputs read once, the gradient written once."""
    over = [f"{op} {dtype}: {v['total']:.1f} > {v['budget']:.1f}"
            for (op, dtype), v in sass_budget.fused_totals(loops).items() if v["total"] > v["budget"]]
    assert not over, "fused forward over the H200 budget:\n" + "\n".join(over)
