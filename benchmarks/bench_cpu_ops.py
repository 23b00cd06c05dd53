"""CPU benchmark of the row ops: C++ kernels against eager PyTorch, side by side in one process.

For each op and vocabulary size: median forward+backward time, and the peak memory each
adds above its inputs (measured in a fresh process). "eager" is the loss as a PyTorch user
writes it (log_softmax, gather, kl_div, …); ours runs with reduction="mean" (the CPU fast
path writes the gradient during the forward), with reduction="none" (separate backward),
and in place (the gradient overwrites the logits).

    python benchmarks/bench_cpu_ops.py                 # N = 2048, V = 32000 and 128256, fp32
    python benchmarks/bench_cpu_ops.py --rows 256 --vocab 4096 --repeats 3   # a quick look
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import unlearn_ext as ue  # noqa: E402
from common import cpu_peak_extra_bytes, machine, median_time, write_json  # noqa: E402
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


def make_inputs(op, rows, vocab):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, vocab, generator=g) * 3
    teachers = [torch.randn(rows, vocab, generator=g) * 3 for _ in range(TEACHERS[op])]
    return x, teachers, torch.randint(0, vocab, (rows,), generator=g)


def fwd_bwd(impl, op, x, teachers, y):
    """One forward+backward. In place, the loss runs on a non-leaf copy whose buffer it may
    overwrite (as logits from an LM head are)."""
    leaf = x.detach().requires_grad_(True)
    logits = leaf * 1.0 if impl == "ours_inplace" else leaf
    IMPLS[impl](op, logits, teachers, y).backward()
    return leaf.grad


# Memory runs in a fresh process: these module-level functions are pickled to it.
def _setup(op, rows, vocab):
    x, teachers, y = make_inputs(op, rows, vocab)
    x.add_(0)  # touch every page before the baseline is read
    return x, teachers, y


def _run(impl, op, state):
    fwd_bwd(impl, op, *state)


class _Case:
    def __init__(self, impl, op, rows, vocab):
        self.impl, self.op, self.rows, self.vocab = impl, op, rows, vocab

    def setup(self):
        return _setup(self.op, self.rows, self.vocab)

    def run(self, state):
        _run(self.impl, self.op, state)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the (slower) memory measurements")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_ops.json"))
    args = ap.parse_args()
    if not ue.backends()["cpu"].available:
        sys.exit(f"the C++ CPU extension is not available: {ue.backends()['cpu'].detail}")

    rows_out = []
    print(f"# {machine()}; N = {args.rows}, fp32, forward+backward, median of {args.repeats}")
    print(f"{'op':14} {'V':>7} {'eager ms':>9} {'ours ms':>8} {'speedup':>7} {'none ms':>8} "
          f"{'eager MB':>9} {'ours MB':>8} {'inplace MB':>10} {'mem ratio':>9}")
    for vocab in args.vocab:
        for op in args.ops:
            x, teachers, y = make_inputs(op, args.rows, vocab)
            times = {impl: median_time(lambda impl=impl: fwd_bwd(impl, op, x, teachers, y), repeats=args.repeats)
                     for impl in ("eager", "ours", "ours_none")}
            mem = {}
            if not args.no_memory:
                for impl in ("eager", "ours", "ours_inplace"):
                    case = _Case(impl, op, args.rows, vocab)
                    mem[impl] = cpu_peak_extra_bytes(case.setup, case.run)
            row = {"op": op, "rows": args.rows, "vocab": vocab, "dtype": "float32",
                   **{f"{k}_s": v for k, v in times.items()}, **{f"{k}_peak_extra_bytes": v for k, v in mem.items()}}
            rows_out.append(row)
            mb = lambda k: f"{mem[k] / 2**20:.0f}" if k in mem else "-"  # noqa: E731
            ratio = f"{mem['ours'] / mem['eager']:.2f}" if mem.get("eager") else "-"
            print(f"{op:14} {vocab:7} {times['eager'] * 1e3:9.1f} {times['ours'] * 1e3:8.1f} "
                  f"{times['eager'] / times['ours']:6.2f}x {times['ours_none'] * 1e3:8.1f} "
                  f"{mb('eager'):>9} {mb('ours'):>8} {mb('ours_inplace'):>10} {ratio:>9}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, rows_out, repeats=args.repeats, cpu_isa=ue.backends()["cpu"].detail)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
