"""Measuring helpers shared by the benchmark scripts: medians of timings, and peak memory
of one case (CUDA: the allocator's peak; CPU: the peak resident set of a fresh process)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
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


def run_in_fresh_process(target: Callable, *args):
    """target(*args, queue) in a fresh (spawned) process; returns what it put on the queue.
    glibc there maps every block over 64 KiB on its own and unmaps it when freed, so the
    resident set follows the live tensors instead of a heap that reuses freed pages (as
    that of a long-running process does). target and args must be picklable."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the child starts
    try:
        proc.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    while True:  # a child that dies (e.g. killed for memory) puts nothing: do not wait for it
        try:
            result = results.get(timeout=1)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the measuring process failed (exit code {proc.exitcode})") from None
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the measuring process failed (exit code {proc.exitcode})")
    return result


def _peak_child(setup, run, threads, results):
    torch.set_num_threads(threads)
    state = setup()  # inputs are allocated and touched before the baseline is read
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = _vm_kib("VmRSS")
    run(state)
    results.put((_vm_kib("VmHWM") - base) * 1024)


def cpu_peak_extra_bytes(setup: Callable[[], object], run: Callable[[object], object]) -> int:
    """Peak memory that run(setup()) adds above its inputs, in a fresh process (Linux: the
    peak resident set is reset once the inputs exist). setup and run must be picklable."""
    return run_in_fresh_process(_peak_child, setup, run, torch.get_num_threads())


def write_json(path: str, rows: list[dict], **meta) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), **meta, "rows": rows}, f, indent=1)
