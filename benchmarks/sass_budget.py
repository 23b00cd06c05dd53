"""SASS instructions per element in the hot loops of the CUDA row kernels, against the
budget at which an H200 stops being memory-bound. No GPU needed: nvcc compiles
csrc/cuda/row_kernels.cu for sm_90, nvdisasm (the toolkit's, or the one in Triton's wheel)
disassembles it with line information, and the loops are found in the machine code.

    python benchmarks/sass_budget.py                  # table of every op x dtype x loop
    python benchmarks/sass_budget.py --json out.json  # the same as JSON

The budget. An H200 (SXM) has 132 multiprocessors, each with 4 schedulers that issue one
warp instruction (32 threads) per cycle, at up to 1.98 GHz (the boost clock, as measured
under load on these machines), so it issues at most

    132 SM x 4 x 32 thread-instructions x 1.98e9 /s = 3.35e13 thread-instructions /s,

and its device-to-device copy moves 4.3e12 bytes /s (read + written, measured on these
machines). A loop that is to run at copy speed may spend at most

    3.35e13 / 4.3e12 = 7.78 instructions per byte of HBM traffic,

that is 7.78 x b x k per element for a loop that reads k inputs of b bytes per element
(pass 1: k = 1 / 2 / 3 for one-, two- and three-input ops = 15.6 / 31.1 / 46.7 in bf16 and
fp16, twice that in fp32) and 7.78 x b x (k + 1) for the separate backward (it reads the
k inputs and writes the gradient). The fused gradient pass (pass 2 of the forward, the
row re-read from L2) adds b bytes per element of HBM traffic (the gradient's write); its
budget is 7.78 x b, and the fused forward as a whole (pass 1 + pass 2) moves the floor,
(k + 1) x b bytes per element, so its total budget is 7.78 x b x (k + 1). Every one of
these is an upper bound on what a loop may cost, not a target: latency, the L2's own
bandwidth and the block merges come on top.

Kernel variants. The forward is compiled three ways per op and dtype (row_kernels.cu's
kWriteGrad, kStaged): "forward" (values only: pass 1), "fused" (the forward that writes
the gradient, pass 2 re-reading the row from L2) and "fused_onchip" (pass 1 also copies
the row into shared memory, pass 2 reads it from there); then the separate "backward".
Every variant's loops are counted and budgeted by the HBM bytes they move: the stage's
shared-memory stores and loads move none.

A hot loop is an innermost loop (a backward branch whose body holds no other) that moves
16-byte vectors (global loads, or shared-memory loads for the on-chip gradient pass); its
elements per iteration are its 16-byte loads per input times the vector's elements (or
its 16-byte global stores, for the gradient pass). Each loop's local-memory accesses
(LDL/STL: ptxas's register spills) are counted too: a spill inside a hot loop would cost
memory traffic per element; spills outside them cost a few bytes per row. The plain losses run
loops that are one basic block each: their count is exact, and these are budgeted. The
general code (a softcap, cross entropy's label smoothing or z-loss, JSD, and the tiles
that hold the label or end the row) has branches inside: every instruction of its body is
counted (an upper bound, marked "<=" and "general" in the table), not budgeted. float64 and mixed dtypes take the scalar path (no vectors): not
budgeted. Rows that fit in one tile of registers run without a loop and are not counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "csrc", "cuda", "row_kernels.cu")]
HEADERS = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")) + glob.glob(os.path.join(ROOT, "csrc", "common", "*.h"))
CACHE = os.path.join(ROOT, "build", "sass-budget")

# The H200's figures (see the docstring) and the budget they give.
SMS, SCHEDULERS, WARP, CLOCK_HZ, COPY_BYTES_PER_S = 132, 4, 32, 1.98e9, 4.3e12
INSTR_PER_BYTE = SMS * SCHEDULERS * WARP * CLOCK_HZ / COPY_BYTES_PER_S

# row_math.h's Op order; jsd (7th) has no hot loop of its own (every tile takes the general
# code, as a softcap, label smoothing or z-loss do): not budgeted.
OPS = ["token_logprob", "cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial"]
INPUTS = {"token_logprob": 1, "cross_entropy": 1, "forward_kl": 2, "reverse_kl": 2, "rkld": 3, "undial": 2}
PATHS = {0: ("float32", 4), 1: ("bfloat16", 2), 2: ("float16", 2), 3: ("scalar", None)}  # row_thread.h's Path
KERNEL = re.compile(r"row_(forward|backward)_kernelILNS_2OpE(\d)E([fd])LNS0_4PathE(\d)E(?:Lb([01])ELb([01])E)?")
VARIANTS = {None: "backward", ("0", "0"): "forward", ("1", "0"): "fused", ("1", "1"): "fused_onchip",
            ("0", "1"): "forward_onchip"}  # the last: JSD's second sum only (not budgeted)
INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+`?\(?(\.L_x_\d+)")


def budget(inputs: int, elem_bytes: int, loop: str) -> float:
    """Instructions per element a loop may issue at copy speed (see the docstring)."""
    traffic = {"pass1": inputs, "pass1_staged": inputs, "fused_grad": 1, "fused_grad_onchip": 1,
               "backward": inputs + 1, "fused_total": inputs + 1}[loop]
    return INSTR_PER_BYTE * elem_bytes * traffic


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: on PATH, under CUDA_HOME, else the copy in Triton's wheel."""
    found = shutil.which(name) or next((p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                 "bin", name),) if os.access(p, os.X_OK)), None)
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def cubin(nvcc: str) -> str:
    """row_kernels.cu compiled for sm_90 as setup.py builds it (-O3 -lineinfo and torch's
    COMMON_NVCC_FLAGS), cached under build/sass-budget until a source changes."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    os.makedirs(CACHE, exist_ok=True)
    out = os.path.join(CACHE, "row_kernels.sm_90.cubin")
    newest = max(os.path.getmtime(p) for p in SOURCES + HEADERS)
    if not os.path.exists(out) or os.path.getmtime(out) < newest:
        cmd = [nvcc, "-std=c++17", "-O3", "-lineinfo", *COMMON_NVCC_FLAGS, "-gencode", "arch=compute_90,code=sm_90",
               "-cubin", "-I" + os.path.join(ROOT, "csrc"), SOURCES[0], "-o", out + ".tmp"]
        subprocess.run(cmd, check=True)
        os.replace(out + ".tmp", out)
    return out


@dataclasses.dataclass
class Loop:
    kernel: str      # forward / fused / fused_onchip / backward (VARIANTS)
    op: str
    dtype: str
    kind: str        # pass1 / pass1_staged / fused_grad / fused_grad_onchip / backward
    instructions: int
    elements: int    # per iteration, per thread
    exact: bool      # one basic block (else every instruction of the body counted)
    lines: str       # source lines of its first instruction
    local: int = 0   # local-memory accesses (register spills) in the body

    @property
    def per_element(self) -> float:
        return self.instructions / self.elements

    @property
    def budget(self) -> float:
        return budget(INPUTS[self.op], PATHS_BY_NAME[self.dtype], self.kind)


PATHS_BY_NAME = {name: b for name, b in PATHS.values()}


def functions(sass: str):
    """(mangled name, [lines]) of every function in nvdisasm -sf output."""
    name, body = None, []
    for line in sass.splitlines():
        m = re.match(r"^//-+ \.text\.(\S+) -+", line)
        if m:
            if name:
                yield name, body
            name, body = m.group(1), []
        elif name:
            body.append(line)
    if name:
        yield name, body


def hot_loops(kernel: str, op: str, dtype: str, lines: list[str]) -> list[Loop]:
    n_per_vec = 16 // PATHS_BY_NAME[dtype]
    instrs, labels, where = [], {}, ""  # (offset, text, source)
    for line in lines:
        if m := LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif line.strip().startswith("//## File"):
            where = re.sub(r'.*/(\w+\.\w+)", line (\d+).*', r"\1:\2", line.strip())
        elif m := INSTR.match(line):
            instrs.append((int(m.group(1), 16), m.group(2), where))
    backs = []  # (first, last) index of each loop body
    for i, (_, text, _) in enumerate(instrs):
        m = BRANCH.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            backs.append((labels[m.group(1)], i))
    loops = []
    for first, last in backs:
        if any(f >= first and l <= last and (f, l) != (first, last) for f, l in backs):
            continue  # not innermost
        body = [t for _, t, _ in instrs[first:last + 1]]
        loads = sum(1 for t in body if re.search(r"\bLDG\.E[A-Z.]*\.128\b", t))
        shared_loads = sum(1 for t in body if re.search(r"\bLDS(?:\.[A-Z0-9]+)*\.128\b", t))
        shared_stores = sum(1 for t in body if re.search(r"\bSTS(?:\.[A-Z0-9]+)*\.128\b", t))
        stores = sum(1 for t in body if re.search(r"\bSTG\.E[A-Z.]*\.128\b", t))
        local = sum(1 for t in body if re.search(r"\b(?:LDL|STL)\b", t))
        if loads == 0 and shared_loads == 0:
            continue  # not a loop that streams the row (scalar ends, zeroing an ignored row)
        branches = sum(1 for t in body[:-1] if BRANCH.search(t))
        if stores:
            kind = "backward" if kernel == "backward" else "fused_grad_onchip" if shared_loads else "fused_grad"
            elements = stores * n_per_vec
        else:
            kind = "pass1_staged" if shared_stores else "pass1"
            elements = (loads or shared_loads) // INPUTS[op] * n_per_vec
        loops.append(Loop(kernel, op, dtype, kind, len(body), elements, branches == 0, instrs[first][2], local))
    return loops


def analyse(cubin_path: str, nvdisasm: str) -> list[Loop]:
    sass = subprocess.run([nvdisasm, "-c", "-gi", "-sf", cubin_path], capture_output=True, text=True,
                          check=True).stdout
    loops = []
    for name, lines in functions(sass):
        m = KERNEL.search(name)
        if not m or m.group(3) != "f" or PATHS[int(m.group(4))][1] is None or int(m.group(2)) >= len(OPS):
            continue  # float64 / scalar variants, JSD: not budgeted
        variant = VARIANTS[None if m.group(1) == "backward" else (m.group(5), m.group(6))]
        if variant == "forward_onchip":
            continue
        kernel, op, dtype = variant, OPS[int(m.group(2))], PATHS[int(m.group(4))][0]
        loops += hot_loops(kernel, op, dtype, lines)
    return loops


def fused_totals(loops: list[Loop]) -> dict:
    """Per fused variant (fused: pass 2 from L2; fused_onchip: from shared memory), op and
    dtype: pass 1 + the gradient pass per element, and the budget of the floor's bytes."""
    out = {}
    for lp in loops:
        if lp.kernel in ("fused", "fused_onchip") and lp.exact:
            cur = out.setdefault((lp.kernel, lp.op, lp.dtype), {"pass1": 0.0, "grad": 0.0})
            part = "grad" if lp.kind.startswith("fused_grad") else "pass1"
            cur[part] = max(cur[part], lp.per_element)
    return {k: {**v, "total": v["pass1"] + v["grad"], "budget": budget(INPUTS[k[1]], PATHS_BY_NAME[k[2]],
                                                                          "fused_total")}
            for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the table as JSON to this file")
    args = ap.parse_args()
    nvcc, nvdisasm = find_tool("nvcc"), find_tool("nvdisasm")
    if not nvcc or not nvdisasm:
        sys.exit(f"sass_budget.py needs nvcc and nvdisasm (found: nvcc={nvcc}, nvdisasm={nvdisasm})")
    loops = analyse(cubin(nvcc), nvdisasm)
    print(f"# H200 budget: {SMS} SM x {SCHEDULERS} x {WARP} x {CLOCK_HZ / 1e9:.2f} GHz / "
          f"{COPY_BYTES_PER_S / 1e12:.1f} TB/s = {INSTR_PER_BYTE:.2f} SASS instructions per byte moved")
    print(f"{'op':14} {'dtype':9} {'variant':12} {'loop':17} {'instr':>6} {'elems':>5} {'per elem':>9} "
          f"{'budget':>7}  ok      spills source")
    order = list(VARIANTS.values())
    for lp in sorted(loops, key=lambda x: (OPS.index(x.op), x.dtype, order.index(x.kernel), x.kind)):
        ok = ("total" if lp.kind.startswith("fused_grad") else "yes" if lp.per_element <= lp.budget else "NO") \
            if lp.exact else "general"  # a gradient pass is budgeted with its pass 1 (the totals below)
        print(f"{lp.op:14} {lp.dtype:9} {lp.kernel:12} {lp.kind:17} {lp.instructions:6} {lp.elements:5} "
              f"{'' if lp.exact else '<='}{lp.per_element:7.1f} {lp.budget:7.1f}  {ok:7} {lp.local:6} {lp.lines}")
    print("\n# the fused forwards (pass 1 + gradient pass) against the floor's budget")
    totals = fused_totals(loops)
    for (variant, op, dtype), v in sorted(totals.items(), key=lambda kv: (OPS.index(kv[0][1]), kv[0][2], kv[0][0])):
        print(f"{op:14} {dtype:9} {variant:12} {v['pass1']:6.1f} + {v['grad']:5.1f} = {v['total']:6.1f}  budget "
              f"{v['budget']:6.1f}  {'yes' if v['total'] <= v['budget'] else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"instructions_per_byte": INSTR_PER_BYTE,
                       "loops": [{**dataclasses.asdict(lp), "per_element": lp.per_element, "budget": lp.budget}
                                 for lp in loops],
                       "fused_totals": [{"variant": k[0], "op": k[1], "dtype": k[2], **v} for k, v in totals.items()]},
                      f, indent=1)


if __name__ == "__main__":
    main()
