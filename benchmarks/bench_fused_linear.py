"""Peak memory and time of each fused-linear loss against "logits = h·Wᵀ, then the loss" in
eager PyTorch (the loss as a user writes it: benchmarks/eager.py), forward + backward.

    python benchmarks/bench_fused_linear.py                  # CPU: N=4096, H=2048, V=128256, fp32
    python benchmarks/bench_fused_linear.py --device cuda    # GPU: N=16384, H=4096, V=128256 and 262144, bf16
    python benchmarks/bench_fused_linear.py --rows 512 --hidden 512 --vocab 32000   # a quick look

Time: median over --repeats runs of forward + backward, eager and fused interleaved (so
that a busy machine slows both alike); CUDA events on the GPU; on the CPU also the
process CPU time (steadier than wall time when other work shares the cores). Peak memory: what a
forward + backward adds above its inputs (CPU: peak resident set of a fresh process per
case; GPU: the allocator's peak). Both implementations return the same gradients
(d_hidden, d_weight), which are part of the peak; "working" memory leaves them out: it is
what the loss itself needs. Distillation losses read teachers with their own weights
(RKLD: two); NPO/SimNPO read sequences of --seq-len tokens. Every row counts (no ignored
rows: fused losses would skip them, eager ones cannot). JSON goes to --out.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_peak_extra_bytes, machine, write_json  # noqa: E402
from eager import ALPHA, GAMMA, eager  # noqa: E402

import unlearn_ext as ue  # noqa: E402
from unlearn_ext._backends import resolve  # noqa: E402
from unlearn_ext.fused_linear import LMHeadInputs, default_chunk_rows  # noqa: E402

LOSSES = ("cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial", "npo", "simnpo")
TEACHERS = {"forward_kl": 1, "reverse_kl": 1, "undial": 1, "rkld": 2}
PARAMS = {"rkld": {"alpha": ALPHA}, "undial": {"gamma": GAMMA}, "npo": {"beta": 0.1}, "simnpo": {"beta": 2.5}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(cfg) -> SimpleNamespace:
    """Student hidden states and head (requiring grad), teacher heads, labels, ℓ^ref."""
    torch.manual_seed(0)
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    n, h, v = cfg.rows, cfg.hidden, cfg.vocab

    def randn(*shape, scale=1.0, grad=False):  # in place: no transient copy raises the CPU baseline
        return torch.randn(*shape, device=device, dtype=dtype).mul_(scale).requires_grad_(grad)

    x = SimpleNamespace(hidden=randn(n, h, grad=True), weight=randn(v, h, scale=h ** -0.5, grad=True))
    x.labels = torch.randint(0, v, (n,), device=device)
    x.teachers = [LMHeadInputs(randn(n, h), randn(v, h, scale=h ** -0.5)) for _ in range(TEACHERS.get(cfg.loss, 0))]
    x.ref_logprob = torch.randn(n // cfg.seq_len, device=device) - 8.0 * cfg.seq_len
    return x


def eager_loss(cfg, x):
    """Logits, then the loss as a PyTorch user writes it (benchmarks/eager.py); NPO/SimNPO
    on the sequence log-probs of log_softmax + gather (the torch backend)."""
    logits = x.hidden @ x.weight.t()
    with torch.no_grad():
        teachers = [t.hidden @ t.weight.t() for t in x.teachers]
    if cfg.loss in ("npo", "simnpo"):
        batch = (-1, cfg.seq_len)
        seq_logits, labels = logits.view(*batch, logits.shape[-1]), x.labels.view(batch)
        kw = dict(backend="torch", **PARAMS[cfg.loss])
        if cfg.loss == "npo":
            return ue.npo_loss(seq_logits, labels, x.ref_logprob, **kw)
        return ue.simnpo_loss(seq_logits, labels, **kw)
    return eager(cfg.loss, logits, teachers, x.labels)


def fused_loss(cfg, x):
    kw = dict(backend=cfg.backend, chunk_size=cfg.chunk_size, **PARAMS.get(cfg.loss, {}))
    if cfg.loss in ("npo", "simnpo"):
        hidden, labels = x.hidden.view(-1, cfg.seq_len, x.hidden.shape[-1]), x.labels.view(-1, cfg.seq_len)
        if cfg.loss == "npo":
            return ue.fused_linear_npo(hidden, x.weight, labels, x.ref_logprob, **kw)
        return ue.fused_linear_simnpo(hidden, x.weight, labels, **kw)
    return getattr(ue, f"fused_linear_{cfg.loss}")(x.hidden, x.weight, *x.teachers, x.labels, **kw)


IMPLS = {"eager": eager_loss, "fused": fused_loss}


def step(cfg, impl, x):
    """One forward + backward; the gradients stay (they are the result)."""
    x.hidden.grad = x.weight.grad = None
    IMPLS[impl](cfg, x).backward()


def _setup(cfg):  # module-level: pickled into the fresh process of cpu_peak_extra_bytes
    return make_inputs(cfg)


def _run(cfg, impl, x):
    step(cfg, impl, x)


def timer(device):
    """fn -> (wall seconds, process CPU seconds or None). On a shared CPU the process time
    is the steadier measure of the work done; on the GPU, CUDA events time the device."""
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, None
        return run

    def run(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu
    return run


def cuda_peak_extra_bytes(cfg, impl, x) -> int:
    x.hidden.grad = x.weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(cfg, impl, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(cfg, impls) -> dict:
    """Peak extra memory and median time of each implementation for one configuration."""
    out = {}
    if cfg.device == "cpu":
        for impl in impls:
            try:
                out[f"{impl}_peak_bytes"] = cpu_peak_extra_bytes(functools.partial(_setup, cfg),
                                                                 functools.partial(_run, cfg, impl))
            except RuntimeError as exc:  # e.g. the fresh process was killed for memory
                print(f"{cfg.loss} {impl}: {exc}", flush=True)
                out[f"{impl}_peak_bytes"] = None
        runnable = [i for i in impls if out[f"{i}_peak_bytes"] is not None]
        x = make_inputs(cfg) if cfg.repeats and runnable else None
    else:
        x = make_inputs(cfg)
        for impl in impls:
            try:
                out[f"{impl}_peak_bytes"] = cuda_peak_extra_bytes(cfg, impl, x)
            except torch.cuda.OutOfMemoryError:
                out[f"{impl}_peak_bytes"] = None  # does not fit: reported as OOM, not timed
                x.hidden.grad = x.weight.grad = None
                gc.collect()
                torch.cuda.empty_cache()
        runnable = [i for i in impls if out[f"{i}_peak_bytes"] is not None]
    run = timer(cfg.device)
    times = {i: [] for i in runnable}
    for _ in range(cfg.warmup if cfg.repeats else 0):
        for impl in runnable:
            step(cfg, impl, x)
    for _ in range(cfg.repeats):
        for impl in runnable:  # interleaved
            times[impl].append(run(lambda: step(cfg, impl, x)))
    for impl in impls:
        samples = times.get(impl)
        out[f"{impl}_time_s"] = statistics.median(t[0] for t in samples) if samples else None
        if cfg.device == "cpu":
            out[f"{impl}_cpu_time_s"] = statistics.median(t[1] for t in samples) if samples else None
    return out


def row_for(cfg, impls) -> dict:
    dtype = DTYPES[cfg.dtype]
    kernels = resolve(cfg.backend, torch.device(cfg.device))
    teachers = TEACHERS.get(cfg.loss, 0)
    element = torch.empty((), dtype=dtype).element_size()
    chunk = cfg.chunk_size or default_chunk_rows(cfg.vocab, cfg.hidden, cfg.vocab * element * (1 + teachers),
                                                 torch.device(cfg.device))
    row = dict(loss=cfg.loss, device=cfg.device, rows=cfg.rows, hidden=cfg.hidden, vocab=cfg.vocab, dtype=cfg.dtype,
               backend=kernels.name if kernels is not None else "torch", chunk_rows=min(chunk, cfg.rows),
               grad_bytes=(cfg.rows + cfg.vocab) * cfg.hidden * element)
    row.update(measure(cfg, impls))
    eager, fused = row.get("eager_peak_bytes"), row.get("fused_peak_bytes")
    if eager and fused:
        row["memory_ratio"] = fused / eager
        row["working_memory_ratio"] = max(fused - row["grad_bytes"], 0) / max(eager - row["grad_bytes"], 1)
    if row.get("eager_time_s") and row.get("fused_time_s"):
        row["time_ratio"] = row["fused_time_s"] / row["eager_time_s"]
    if row.get("eager_cpu_time_s") and row.get("fused_cpu_time_s"):
        row["cpu_time_ratio"] = row["fused_cpu_time_s"] / row["eager_cpu_time_s"]
    return row


def gib(b):
    return "  n/a " if b is None else f"{b / 2**30:6.2f}"  # n/a: out of memory (or failed, see above)


def print_row(r):
    t = lambda s: "  -   " if s is None else f"{s:7.3f}"  # noqa: E731
    print(f"{r['loss']:<14} V={r['vocab']:<7} chunk={r['chunk_rows']:<5} "
          f"time eager {t(r.get('eager_time_s'))} s fused {t(r.get('fused_time_s'))} s "
          f"(x{r.get('time_ratio', float('nan')):.2f}; CPU time x{r.get('cpu_time_ratio', float('nan')):.2f})  peak GiB eager {gib(r.get('eager_peak_bytes'))} "
          f"fused {gib(r.get('fused_peak_bytes'))} (grads {gib(r['grad_bytes'])}; working memory "
          f"x{r.get('working_memory_ratio', float('nan')):.3f})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, from " + ", ".join(LOSSES))
    p.add_argument("--rows", type=int, help="N (default: 4096 on cpu, 16384 on cuda)")
    p.add_argument("--hidden", type=int, help="H (default: 2048 on cpu, 4096 on cuda)")
    p.add_argument("--vocab", help="V, comma-separated (default: 128256 on cpu; 128256,262144 on cuda)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of NPO/SimNPO")
    p.add_argument("--chunk-size", type=int, help="rows per chunk (default: the library's choice)")
    p.add_argument("--backend", help="row-kernel backend of the fused losses (default: the fastest)")
    p.add_argument("--impls", default="eager,fused")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default: 3 on cpu, 5 on cuda; 0: memory only)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--json", help="file name under --out (default: fused_linear_<device>_N<rows>_H<hidden>_<dtype>.json)")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    impls = a.impls.split(",")
    vocabs = [int(v) for v in (a.vocab or ("128256,262144" if gpu else "128256")).split(",")]
    rows = []
    print(f"# {machine()}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    name = (f"fused_linear_{a.device}_N{a.rows or (16384 if gpu else 4096)}_H{a.hidden or (4096 if gpu else 2048)}_"
            f"{a.dtype or ('bfloat16' if gpu else 'float32')}.json")
    path = os.path.join(a.out, a.json or name)
    for vocab in vocabs:
        for loss in a.losses.split(","):
            if loss not in LOSSES:
                p.error(f"unknown loss {loss!r}")
            n = a.rows or (16384 if gpu else 4096)
            if loss in ("npo", "simnpo") and n % a.seq_len:
                p.error(f"--rows ({n}) must be a multiple of --seq-len ({a.seq_len})")
            cfg = SimpleNamespace(loss=loss, device=a.device, rows=n,
                                  hidden=a.hidden or (4096 if gpu else 2048), vocab=vocab,
                                  dtype=a.dtype or ("bfloat16" if gpu else "float32"), seq_len=a.seq_len,
                                  chunk_size=a.chunk_size, backend=a.backend, warmup=a.warmup,
                                  repeats=(5 if gpu else 3) if a.repeats is None else a.repeats)
            rows.append(row_for(cfg, impls))
            print_row(rows[-1])
            write_json(path, rows, benchmark="fused_linear", impls=impls)  # after each row: a long run keeps its rows
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
