"""Sweeps the launch shapes (BLOCK, num_warps) of the Triton row kernels on a GPU.

    python benchmarks/bench_triton_configs.py                      # every op, V = 32000, 128256, 256000
    python benchmarks/bench_triton_configs.py --ops cross_entropy --vocab 128256 --rows 8192

For every op, vocabulary size and kernel (forward, forward writing the gradient, backward)
it times each candidate shape (CUDA-event medians, triton.testing.do_bench), prints the
best next to the shipped table's choice (unlearn_ext/triton_kernels/configs.py) with the
effective bandwidth, and writes every row as JSON (default
benchmarks/results/triton_configs_<gpu>.json). The best shapes belong in configs._TABLE
under the GPU's compute capability.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402

from unlearn_ext.ops._row_loss import RowParams  # noqa: E402
from unlearn_ext.triton_kernels import TritonRowKernels  # noqa: E402
from unlearn_ext.triton_kernels.configs import INPUTS, config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KINDS = ("forward", "forward+grad", "backward")


def candidates():
    """Power-of-two blocks of 1K-16K columns at 4-32 elements per thread."""
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            if 4 <= block // (32 * warps) <= 32:
                yield block, warps


def inputs(op, rows, vocab, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, vocab, device=device, generator=gen).mul_(3).to(dtype)
    teachers = [torch.randn(rows, vocab, device=device, generator=gen).mul_(3).to(dtype)
                for _ in range(INPUTS[op] - 1)]
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    labels[torch.rand(rows, device=device, generator=gen) < 0.1] = -100
    return logits, teachers + [None] * (2 - len(teachers)), labels


def timed(kernels, kind, op, logits, teachers, labels, params, stats, grad):
    import triton.testing

    if kind == "forward":
        fn = lambda: kernels.forward(op, logits, *teachers, labels, params)  # noqa: E731
    elif kind == "forward+grad":
        fn = lambda: kernels.forward_with_grad(op, logits, *teachers, labels, params, grad, torch.ones((), device=logits.device))  # noqa: E731
    else:
        ones = torch.ones(logits.shape[0], device=logits.device)
        fn = lambda: kernels.backward(op, logits, *teachers, labels, stats, ones, params, grad)  # noqa: E731
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3


def bytes_moved(kind, op, logits):
    """Bytes a kernel must move at least: its [N, V] inputs read once, the gradient written."""
    size = logits.numel() * logits.element_size()
    return size * (INPUTS[op] + (kind != "forward"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=list(INPUTS))
    parser.add_argument("--vocab", nargs="+", type=int, default=[32000, 128256, 256000])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_triton_configs.py needs a CUDA GPU")
    device = torch.device("cuda")
    params = RowParams(alpha=8.0, gamma=10.0)
    rows_out = []
    print(f"{machine()}; rows {args.rows}, {args.dtype}")
    for op in args.ops:
        for vocab in args.vocab:
            logits, teachers, labels = inputs(op, args.rows, vocab, DTYPES[args.dtype], device)
            _, stats = TritonRowKernels().forward(op, logits, *teachers, labels, params)
            grad = torch.empty_like(logits)
            for kind in KINDS:
                table_kind = "backward" if kind == "backward" else "forward"
                shipped = config(table_kind, op, vocab, device)
                results = {}
                for shape in candidates():
                    kernels = TritonRowKernels(config=lambda *_, shape=shape: shape)
                    results[shape] = timed(kernels, kind, op, logits, teachers, labels, params, stats, grad)
                    rows_out.append(dict(op=op, vocab=vocab, kind=kind, block=shape[0], num_warps=shape[1],
                                         seconds=results[shape], shipped=shape == shipped))
                best = min(results, key=results.get)
                gbps = lambda t: bytes_moved(kind, op, logits) / t / 1e9  # noqa: E731
                shipped_t = results.get(shipped) or timed(TritonRowKernels(), kind, op, logits, teachers, labels,
                                                          params, stats, grad)
                print(f"{op:14s} V={vocab:<7d} {kind:13s} best {best} {results[best] * 1e3:7.3f} ms "
                      f"({gbps(results[best]):5.0f} GB/s)   shipped {shipped} {shipped_t * 1e3:7.3f} ms "
                      f"({gbps(shipped_t):5.0f} GB/s)")
            del logits, teachers, grad
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"triton_configs_{gpu}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, rows_out, num_rows=args.rows, dtype=args.dtype)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
