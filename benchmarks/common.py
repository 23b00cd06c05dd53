"""Measuring helpers shared by the benchmark scripts: medians of timings, and peak memory
of one case (CUDA: the allocator's peak; CPU: the peak resident set of a fresh process)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Callable

import torch

from unlearn_ext.eval.report import machine


def median_time(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of fn() in seconds (CUDA: synchronised around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _child(setup, run, queue):
    torch.set_num_threads(queue.get())
    state = setup()  # inputs are allocated and touched before the baseline is read
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = _vm_kib("VmRSS")
    run(state)
    queue.put((_vm_kib("VmHWM") - base) * 1024)


def cpu_peak_extra_bytes(setup: Callable[[], object], run: Callable[[object], object]) -> int:
    """Peak memory that run(setup()) adds above its inputs, in a fresh process (Linux: the
    peak resident set is reset once the inputs exist). setup and run must be picklable."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    queue.put(torch.get_num_threads())
    proc = ctx.Process(target=_child, args=(setup, run, queue))
    # glibc then maps every block over 64 KiB on its own and unmaps it when freed, so the
    # peak resident set follows the live tensors instead of a reused heap.
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory measurement failed (exit code {proc.exitcode})")
    return queue.get()


def write_json(path: str, rows: list[dict], **meta) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), **meta, "rows": rows}, f, indent=1)
