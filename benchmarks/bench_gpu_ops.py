"""GPU benchmark of the row ops: our CUDA and Triton kernels side by side with eager
PyTorch (the reference ops, unlearn_ext.reference), torch.compile of the same, and
Liger-Kernel where it has the same op, in one process.

    python benchmarks/bench_gpu_ops.py --out benchmarks/results            # N = 16384, 4 vocabularies, bf16
    python benchmarks/bench_gpu_ops.py --vocab 32000 --ops cross_entropy --repeats 5   # a quick look

Each case is a forward + backward from logits, reduction "mean" (no ignored rows):
loss = f(logits, ...), then torch.autograd.grad(loss, logits), so that every
implementation returns its gradient as it makes it (no accumulation into .grad, which
would clone an in-place gradient). Implementations:
  cuda, triton          our kernels through the op layer (unlearn_ext.ops): which kernel
                        writes the gradient (the forward, on the fused path, or the backward
                        kernel) is the op layer's choice, not this script's
  cuda_inplace          the same, gradient written over the logits (inplace_backward=True)
  eager                 the reference ops (float32 math on the inputs' dtype)
  compile               torch.compile of the reference ops (dynamic shapes: one compile per op)
  liger                 Liger-Kernel's autograd functions from its ops modules (never its
                        transformers patches): LigerCrossEntropyFunction (it writes the
                        gradient over the logits during the forward, like cuda_inplace);
                        LigerKLDivLossFunction(log_target=True) on log_softmax of both
                        (forward KL); LigerJSDFunction(beta=1) on log_softmax of both (reverse
                        KL: Liger's input is the student, its target the teacher). Those two
                        take log-probabilities: the eager log_softmax is part of their time
Time: CUDA events around each step, median of --repeats after --warmup; inputs rotate
through enough copies to exceed twice the L2 cache (at these sizes, one copy). Memory: the
allocator's peak during one step above the inputs; "beyond grad" subtracts the gradient
each implementation must return (nothing for in-place). Bytes floor (REFERENCES.md): the
inputs read once and the gradient written once, 2·N·V·b for one input, 3·N·V·b with a
teacher, 4·N·V·b for RKLD; achieved bandwidth = floor / time, against a device-to-device
copy measured here. Cases run until --time-budget is spent (torch.compile last: it spends
the most on compiling); the rest are listed as skipped. Writes <name>.csv and <name>.json
(--name, default gpu_ops) to --out, rewritten after every case, so a run cut short keeps
what it measured.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import itertools
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import unlearn_ext as ue  # noqa: E402
from common import machine, write_json  # noqa: E402

OPS = ["token_logprob", "cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial"]
TEACHERS = {"token_logprob": 0, "cross_entropy": 0, "forward_kl": 1, "reverse_kl": 1, "rkld": 2, "undial": 1}
PARAMS = {"rkld": {"alpha": 8.0}, "undial": {"gamma": 10.0}}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IMPLS = ["cuda", "cuda_inplace", "triton", "eager", "liger", "compile"]


def ours(op, backend, inplace=False):
    fn, kw = getattr(ue, op), PARAMS.get(op, {})
    return lambda x, ts, y: fn(x, *ts, y, reduction="mean", backend=backend, inplace_backward=inplace, **kw)


def reference(op):
    fn, kw = ue.reference.ROW_OPS[op], PARAMS.get(op, {})
    return lambda x, ts, y: fn(x, *ts, y, **kw).mean()


def liger(op):
    """Liger-Kernel's loss for the op from logits, or a string saying why there is none."""
    if op not in ("cross_entropy", "forward_kl", "reverse_kl"):
        return "Liger-Kernel has no such op"
    try:  # the ops modules alone: liger_kernel.transformers would import and patch model code
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.jsd import LigerJSDFunction
        from liger_kernel.ops.kl_div import LigerKLDivLossFunction
    except ImportError as exc:
        return f"Liger-Kernel not importable ({exc})"
    log_softmax = torch.log_softmax
    if op == "cross_entropy":  # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction)
        return lambda x, ts, y: LigerCrossEntropyFunction.apply(x, y, None, -100, 0.0, 0.0, "mean")[0]
    if op == "forward_kl":  # (y_pred, y_true, reduction, log_target)
        return lambda x, ts, y: LigerKLDivLossFunction.apply(log_softmax(x, -1), log_softmax(ts[0], -1),
                                                             "batchmean", True)
    # reverse KL: (input, target, shift_labels, beta)
    return lambda x, ts, y: LigerJSDFunction.apply(log_softmax(x, -1), log_softmax(ts[0], -1), None, 1.0)


def implementation(impl, op, compiled):
    """The loss function of impl for op, or a string saying why there is none."""
    status = ue.backends()
    if impl in ("cuda", "cuda_inplace", "triton"):
        backend = impl.split("_")[0]
        if not status[backend].available:
            return f"unavailable: {status[backend].detail}"
        return ours(op, backend, inplace=impl == "cuda_inplace")
    if impl == "eager":
        return reference(op)
    if impl == "compile":
        if op not in compiled:
            compiled[op] = torch.compile(reference(op), dynamic=True)
        return compiled[op]
    return liger(op)


def make_inputs(op, rows, vocab, dtype, copies):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn():
        return torch.randn(rows, vocab, device="cuda", dtype=dtype, generator=g) * 2

    sets = []
    for _ in range(copies):
        x = randn().requires_grad_(True)
        sets.append((x, [randn() for _ in range(TEACHERS[op])],
                     torch.randint(0, vocab, (rows,), device="cuda", generator=g)))
    return sets


def step(fn, x, ts, y):
    loss = fn(x, ts, y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def time_ms(fn, sets, warmup, repeats):
    cycle = itertools.cycle(sets)
    for _ in range(warmup):
        step(fn, *next(cycle))
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        inputs = next(cycle)
        start.record()
        step(fn, *inputs)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_extra_bytes(fn, inputs):
    """Allocator peak of one step above what is allocated before it (inputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grad = step(fn, *inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grad
    return peak


def copy_bandwidth(nbytes=2**31, repeats=20):
    """Device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times[2:])


def versions():
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
           "backends": {k: repr(v) for k, v in ue.backends().items()}}
    for dist in ("triton", "liger-kernel", "cut-cross-entropy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_case(impl, op, vocab, args, compiled, copy_bw):
    row = {"op": op, "vocab": vocab, "rows": args.rows, "dtype": args.dtype, "impl": impl}
    fn = implementation(impl, op, compiled)
    if isinstance(fn, str):
        return {**row, "note": fn}
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    input_bytes = args.rows * vocab * elem * (1 + TEACHERS[op])
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    copies = max(1, math.ceil(2 * l2 / input_bytes))
    try:
        sets = make_inputs(op, args.rows, vocab, dtype, copies)
        ms = time_ms(fn, sets, args.warmup, args.repeats)
        peak = peak_extra_bytes(fn, sets[0])
    except torch.OutOfMemoryError:
        return {**row, "note": "out of memory"}
    finally:
        sets = None
        torch.cuda.empty_cache()
    grad_bytes = 0 if impl == "cuda_inplace" else args.rows * vocab * elem
    floor = args.rows * vocab * elem * (2 + TEACHERS[op])
    gbps = floor / (ms / 1e3) / 1e9
    return {**row, "ms": ms, "peak_extra_bytes": peak, "beyond_grad_bytes": peak - grad_bytes,
            "floor_bytes": floor, "gbps": gbps, "pct_copy": 100 * gbps * 1e9 / copy_bw, "note": ""}


FIELDS = ["op", "vocab", "rows", "dtype", "impl", "ms", "gbps", "pct_copy", "speedup_vs_eager", "speedup_vs_liger",
          "peak_extra_bytes", "beyond_grad_bytes", "floor_bytes", "note"]


def save(results, args, copy_bw):
    """Writes what is measured so far (speedups against eager and Liger filled in)."""
    eager_ms = {(r["op"], r["vocab"]): r["ms"] for r in results if r["impl"] == "eager" and "ms" in r}
    liger_ms = {(r["op"], r["vocab"]): r["ms"] for r in results if r["impl"] == "liger" and "ms" in r}
    for r in results:
        key = (r["op"], r["vocab"])
        if "ms" in r and key in eager_ms:
            r["speedup_vs_eager"] = eager_ms[key] / r["ms"]
        if "ms" in r and key in liger_ms:
            r["speedup_vs_liger"] = liger_ms[key] / r["ms"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(results)
    write_json(os.path.join(args.out, args.name + ".json"), results, copy_bytes_per_s=copy_bw, versions=versions(),
               repeats=args.repeats, warmup=args.warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--vocab", default="32000,128256,151936,262144", help="comma-separated")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated, from " + ", ".join(OPS))
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, from " + ", ".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later cases are skipped")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="gpu_ops", help="file name of the results, without .csv/.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_ops.py needs a CUDA device")
    vocabs = [int(v) for v in args.vocab.split(",")]
    ops, impls = args.ops.split(","), args.impls.split(",")
    for name, given, known in (("op", ops, OPS), ("impl", impls, IMPLS)):
        if set(given) - set(known):
            sys.exit(f"unknown {name}(s): {', '.join(sorted(set(given) - set(known)))}")

    began = time.monotonic()
    copy_bw = copy_bandwidth()
    print(f"# {machine()}; N = {args.rows}, {args.dtype}, forward + backward, median of {args.repeats}; "
          f"device-to-device copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    compiled, results = {}, []
    # torch.compile last: if the budget runs out, it is what goes unmeasured.
    sweeps = [[i for i in impls if i != "compile"], [i for i in impls if i == "compile"]]
    for sweep in sweeps:
        for vocab, op, impl in itertools.product(vocabs, ops, sweep):
            if time.monotonic() - began > args.time_budget:
                row = {"op": op, "vocab": vocab, "rows": args.rows, "dtype": args.dtype, "impl": impl,
                       "note": "skipped: time budget"}
            else:
                row = run_case(impl, op, vocab, args, compiled, copy_bw)
            results.append(row)
            save(results, args, copy_bw)
            if "ms" in row:
                print(f"{op:14} {vocab:7} {impl:13} {row['ms']:9.2f} ms {row['gbps']:7.0f} GB/s "
                      f"{row['pct_copy']:5.1f}% of copy  peak +{row['peak_extra_bytes'] / 2**30:6.2f} GiB "
                      f"(beyond grad {row['beyond_grad_bytes'] / 2**20:8.1f} MiB)", flush=True)
            elif not row["note"].startswith("skipped"):
                print(f"{op:14} {vocab:7} {impl:13} {row['note']}", flush=True)

    ours_impl = "cuda" if any(r["impl"] == "cuda" and "ms" in r for r in results) else "triton"
    print(f"\n# summary (ours: the {ours_impl} kernels; targets: >= 70 % of copy bandwidth, >= 3x eager, faster than "
          f"Liger, memory beyond the gradient O(N))\n{'op':14} {'V':>7} {ours_impl + ' ms':>8} {'% copy':>7} "
          f"{'x eager':>8} {'x compile':>9} {'x liger':>8} {'beyond grad MiB':>15}")
    by_key = {(r["op"], r["vocab"], r["impl"]): r for r in results}
    for vocab, op in itertools.product(vocabs, ops):
        ours_row = by_key.get((op, vocab, ours_impl), {})
        if "ms" not in ours_row:
            continue

        def ratio(impl):
            other = by_key.get((op, vocab, impl), {})
            return f"{other['ms'] / ours_row['ms']:.2f}" if "ms" in other else "-"

        print(f"{op:14} {vocab:7} {ours_row['ms']:8.2f} {ours_row['pct_copy']:7.1f} {ratio('eager'):>8} "
              f"{ratio('compile'):>9} {ratio('liger'):>8} {ours_row['beyond_grad_bytes'] / 2**20:15.1f}")
    print(f"wrote {os.path.join(args.out, args.name)}.csv and .json")


if __name__ == "__main__":
    main()
