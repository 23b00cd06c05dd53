"""CPU benchmark of the row ops: C++ kernels against eager PyTorch and torch.compile, side
by side in one process.

For each op and vocabulary size: median forward+backward time (wall and CPU time: on a
shared machine the CPU time of the process, all its threads, is the steadier measure), and
the peak memory each adds above its inputs (measured in a fresh process). "eager" is the
loss as a PyTorch user writes it (log_softmax, gather, kl_div, …); "compile" the same
function under torch.compile (inductor, which writes fused C++ for it; compiled and warmed
up once, outside the timing); ours runs with reduction="mean" (the CPU fast path writes the
gradient during the forward), with reduction="none" (separate backward), and in place (the
gradient overwrites the logits). "alternating": ours timed right after a call of the compiled
loss, as in a process that also runs compiled code (a user who compiles the model),
interleaved with ours timed right after ours ("alt/alone" is their ratio; time_paired); it
should stay within 10 % of ours alone.

    python benchmarks/bench_cpu_ops.py                 # N = 2048, V = 32000 and 128256, fp32
    python benchmarks/bench_cpu_ops.py --rows 256 --vocab 4096 --repeats 3   # a quick look
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import unlearn_ext as ue  # noqa: E402
from common import cpu_peak_extra_bytes, machine, write_json  # noqa: E402
from eager import ALPHA, GAMMA, eager  # noqa: E402

OPS = ["token_logprob", "cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial"]
TEACHERS = {"token_logprob": 0, "cross_entropy": 0, "forward_kl": 1, "reverse_kl": 1, "rkld": 2, "undial": 1}


def ours(op, x, teachers, y, reduction="mean", inplace=False):
    kw = {"alpha": ALPHA} if op == "rkld" else {"gamma": GAMMA} if op == "undial" else {}
    out = getattr(ue, op)(x, *teachers, y, reduction=reduction, backend="cpu", inplace_backward=inplace, **kw)
    return out.mean() if reduction == "none" else out


IMPLS = {
    "eager": lambda op, x, t, y: eager(op, x, t, y),
    "ours": lambda op, x, t, y: ours(op, x, t, y),
    "ours_none": lambda op, x, t, y: ours(op, x, t, y, reduction="none"),
    "ours_inplace": lambda op, x, t, y: ours(op, x, t, y, inplace=True),
}


def _usage():
    """(CPU seconds, minor page faults) of this process so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def time_both(fn, before=None, warmup=1, repeats=5):
    """Medians of (wall s, CPU s, minor page faults) of fn(), each call preceded by before()
    (untimed). The faults tell a fresh buffer's first touch (4 KiB pages where the kernel
    found no huge page) from time lost to other threads."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    samples = []
    for _ in range(repeats):
        if before:
            before()
        samples.append(_sample(fn))
    return _medians(samples)


def _sample(fn):
    """(wall s, CPU s, minor page faults) of one call of fn()."""
    (c0, f0), w0 = _usage(), time.perf_counter()
    fn()
    wall = time.perf_counter() - w0
    c1, f1 = _usage()
    return wall, c1 - c0, f1 - f0


def _medians(samples):
    return tuple(statistics.median(x) for x in zip(*samples))


def time_paired(fn, other, repeats=5):
    """Medians of (wall s, CPU s, minor page faults) of fn() right after other() and of fn()
    right after fn(), interleaved (other, fn, fn, other, fn, fn, ...): the two are measured in
    the same moments of the machine, so a slow phase of a shared or virtual machine (medians
    of separate runs moved by 30 % here) weighs on both alike and the ratio is the effect."""
    other()
    fn()
    after_other, after_fn = [], []
    for _ in range(repeats):
        other()
        after_other.append(_sample(fn))
        after_fn.append(_sample(fn))
    return _medians(after_other), _medians(after_fn)


def make_inputs(op, rows, vocab, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    teachers = [(torch.randn(rows, vocab, generator=g) * 3).to(dtype) for _ in range(TEACHERS[op])]
    return x, teachers, torch.randint(0, vocab, (rows,), generator=g)


def fwd_bwd(impl, op, x, teachers, y):
    """One forward+backward. In place, the loss runs on a non-leaf copy whose buffer it may
    overwrite (as logits from an LM head are)."""
    leaf = x.detach().requires_grad_(True)
    logits = leaf * 1.0 if impl == "ours_inplace" else leaf
    IMPLS[impl](op, logits, teachers, y).backward()
    return leaf.grad


def _compiled_fwd_bwd(compiled, x):
    leaf = x.detach().requires_grad_(True)
    compiled(leaf).backward()
    return leaf.grad


# Memory runs in a fresh process: these module-level functions are pickled to it.
def _setup(op, rows, vocab, dtype):
    x, teachers, y = make_inputs(op, rows, vocab, getattr(torch, dtype))
    x.add_(0)  # touch every page before the baseline is read
    return x, teachers, y


def _run(impl, op, state):
    fwd_bwd(impl, op, *state)


class _Case:
    def __init__(self, impl, op, rows, vocab, dtype):
        self.impl, self.op, self.rows, self.vocab, self.dtype = impl, op, rows, vocab, dtype

    def setup(self):
        return _setup(self.op, self.rows, self.vocab, self.dtype)

    def run(self, state):
        _run(self.impl, self.op, state)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the (slower) memory measurements")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_ops.json"))
    args = ap.parse_args()
    if not ue.backends()["cpu"].available:
        sys.exit(f"the C++ CPU extension is not available: {ue.backends()['cpu'].detail}")

    rows_out = []
    print(f"# {machine()}; N = {args.rows}, {args.dtype}, {torch.get_num_threads()} threads, forward+backward, median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} at the start; ms wall (CPU time of the process)")
    print(f"{'op':14} {'V':>7} {'eager':>15} {'compile':>15} {'ours':>15} {'x eager':>7} {'x compile':>9} "
          f"{'alternating':>15} {'alt/alone':>9} {'faults':>13} {'none':>8} {'eager MB':>9} {'ours MB':>8} {'mem ratio':>9}")
    for vocab in args.vocab:
        for op in args.ops:
            x, teachers, y = make_inputs(op, args.rows, vocab, getattr(torch, args.dtype))
            run = {impl: (lambda impl=impl: fwd_bwd(impl, op, x, teachers, y)) for impl in IMPLS}
            compiled = torch.compile(lambda leaf, op=op: eager(op, leaf, teachers, y))
            run["compile"] = lambda: _compiled_fwd_bwd(compiled, x)
            run["compile"]()  # compiles (forward and backward graphs): outside the timing
            times = {impl: time_both(run[impl], repeats=args.repeats) for impl in ("eager", "compile", "ours",
                                                                                     "ours_none")}
            times["alternating"], times["alternating_alone"] = time_paired(run["ours"], run["compile"],
                                                                           repeats=args.repeats)
            mem = {}
            if not args.no_memory:
                for impl in ("eager", "ours", "ours_inplace"):
                    case = _Case(impl, op, args.rows, vocab, args.dtype)
                    mem[impl] = cpu_peak_extra_bytes(case.setup, case.run)
            row = {"op": op, "rows": args.rows, "vocab": vocab, "dtype": args.dtype,
                   "load_average": os.getloadavg()[0],
                   **{f"{k}_s": v[0] for k, v in times.items()}, **{f"{k}_cpu_s": v[1] for k, v in times.items()},
                   **{f"{k}_minor_faults": v[2] for k, v in times.items()},
                   **{f"{k}_peak_extra_bytes": v for k, v in mem.items()}}
            rows_out.append(row)
            mb = lambda k: f"{mem[k] / 2**20:.0f}" if k in mem else "-"  # noqa: E731
            mem_ratio = f"{mem['ours'] / mem['eager']:.2f}" if mem.get("eager") else "-"
            ms = lambda k: f"{times[k][0] * 1e3:.0f} ({times[k][1] * 1e3:.0f})"  # noqa: E731
            ratio = lambda a, b: times[a][0] / times[b][0]  # noqa: E731
            print(f"{op:14} {vocab:7} {ms('eager'):>15} {ms('compile'):>15} {ms('ours'):>15} "
                  f"{ratio('eager', 'ours'):6.2f}x {ratio('compile', 'ours'):8.2f}x {ms('alternating'):>15} "
                  f"{ratio('alternating', 'alternating_alone'):9.2f} {times['ours'][2]:6.0f}/{times['alternating'][2]:<6.0f} "
                  f"{times['ours_none'][0] * 1e3:8.0f} "
                  f"{mb('eager'):>9} {mb('ours'):>8} {mem_ratio:>9}", flush=True)
    print("x eager, x compile and alt/alone are ratios of median wall times (run it alone on the machine); "
          "faults: ours' minor page faults per call, alone/alternating")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, rows_out, repeats=args.repeats, cpu_isa=ue.backends()["cpu"].detail)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
