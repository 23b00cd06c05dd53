"""Repeated calls of every op (forward + backward, every kernel backend here) do not grow
memory: no leak in the extensions. (The torch backend is PyTorch's own code.)

CPU: the process's resident set after a warm-up, over many calls, may not grow by more than
an eighth of what leaking one [N, V] buffer per call would add. GPU: the caching
allocator's count of allocated bytes returns to its value before the calls. And every call
lets go of its logits (no reference cycle through the autograd context keeps them alive).
"""
from __future__ import annotations

import ctypes
import gc
import os
import weakref

import pytest
import torch

import unlearn_ext as ue

from conftest import KERNEL_BACKEND_DEVICES
from row_op_suite import is_interpreted

N, V = 32, 8192
WARMUP, CALLS = 20, 120
# Not the Triton interpreter: it runs kernels in Python (a minute per op here) and measures
# the interpreter, not the kernels; the GPU check runs triton-cuda.
BACKENDS = [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in KERNEL_BACKEND_DEVICES if not is_interpreted(p)]
OPS = ["token_logprob", "cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial", "npo"]


def make_call(op, backend, device, n=N, v=V):
    """One forward + backward of `op`; returns a weak reference to the logits it used."""
    teachers = {"forward_kl": 1, "reverse_kl": 1, "rkld": 2, "undial": 1}.get(op, 0)
    teacher = [torch.randn(n, v, device=device) for _ in range(teachers)]
    labels = torch.randint(0, v, (n,), device=device)
    labels[::5] = -100
    ref = torch.zeros(4, device=device)
    seq = torch.arange(4, device=device).repeat_interleave(n // 4)

    def call(reduction):
        x = torch.randn(n, v, device=device, requires_grad=True)
        if op == "npo":
            loss = ue.npo_loss(x, labels, ref, seq, num_sequences=4, backend=backend)
        else:
            out = getattr(ue, op)(x, *teacher, labels, reduction=reduction, backend=backend)
            loss = out.sum() if reduction == "none" else out
        loss.backward()
        return weakref.ref(x)

    return call


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
DEFAULT_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's dynamic threshold stops (64-bit)


@pytest.fixture(autouse=True, scope="module")
def freed_buffers_leave_the_resident_set():
    """Serve every [N, V]-sized buffer by its own mmap, returned to the system on free.

    glibc raises its mmap threshold each time a large mmapped block is freed, so after the
    earlier tests a 1 MiB buffer comes from heap pages freed long ago: the resident set then
    neither grows with a leak nor shrinks on free, and the measure is blind. A fixed
    threshold (which also turns off the dynamic raise) makes the resident set follow the
    buffers that are alive.
    """
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    assert mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1, "mallopt(M_MMAP_THRESHOLD) refused"
    yield
    mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD_MAX)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_repeated_calls_do_not_grow_memory(op, backend):
    name, device = backend
    n, v, calls = N, V, CALLS
    call = make_call(op, name, device, n, v)
    reductions = ("none", "sum")
    for i in range(WARMUP):
        call(reductions[i % 2])
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    for i in range(calls):
        x = call(reductions[i % 2])
        assert x() is None, f"{op}: the logits of a finished call are still alive (a reference cycle)"
    gc.collect()
    buffer = n * v * 4
    if device == "cuda":
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        assert grown < buffer, f"{op}: {grown} bytes still allocated after {calls} calls"
    else:
        grown = rss_bytes() - before
        assert grown < calls * buffer / 8, (f"{op}: resident memory grew by {grown / 2**20:.1f} MiB over {calls} "
                                            f"calls (one [N, V] buffer is {buffer / 2**20:.1f} MiB)")


def test_leak_check_can_fail():
    """The CPU measure sees a leak of one [N, V] buffer per call."""
    kept = []
    before = rss_bytes()
    for _ in range(CALLS // 4):
        kept.append(torch.ones(N, V))
    assert rss_bytes() - before >= (CALLS // 4) * N * V * 4 / 8
