"""Repeated calls of every op (forward + backward, every kernel backend here) do not grow
memory: no leak in the extensions. (The torch backend is PyTorch's own code.)

CPU: the resident set after a warm-up, over many calls, may not grow by more than an eighth
of what leaking one [N, V] buffer per call would add. It is measured in a fresh process
where glibc maps every block over 64 KiB on its own and unmaps it when freed: in the test
process, heap pages freed by earlier tests are reused by new buffers, and the resident set
would neither grow with a leak nor shrink on free (CI saw exactly that). GPU: the caching
allocator's count of allocated bytes returns to its value before the calls. And every call
lets go of its logits (no reference cycle through the autograd context keeps them alive).
"""
from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch

import unlearn_ext as ue

from conftest import KERNEL_BACKEND_DEVICES
from row_op_suite import is_interpreted

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from common import run_in_fresh_process  # noqa: E402  (the benchmarks' fresh-process measure)

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


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_growth(cases):
    """In a fresh process: {case: (bytes the resident set grew over CALLS calls, whether a
    finished call's logits stayed alive)}; case = (op, backend) or "leak" (a buffer kept per call)."""
    out = {}
    for case in cases:
        if case == "leak":
            kept = []
            before = rss_bytes()
            for _ in range(CALLS // 4):
                kept.append(torch.ones(N, V))
            out[case] = (rss_bytes() - before, False)
            continue
        op, backend = case
        call = make_call(op, backend, "cpu")
        reductions = ("none", "sum")
        for i in range(WARMUP):
            call(reductions[i % 2])
        gc.collect()
        before = rss_bytes()
        alive = False
        for i in range(CALLS):
            alive |= call(reductions[i % 2])() is not None
        gc.collect()
        out[case] = (rss_bytes() - before, alive)
    return out


def _child(cases, queue):
    os.environ["UNLEARN_EXT_POISON"] = "1"
    queue.put(_cpu_growth(cases))


@pytest.fixture(scope="module")
def cpu_growth():
    cases = [(op, name) for op in OPS for name, device in (p.values[0] for p in BACKENDS) if device == "cpu"]
    return run_in_fresh_process(_child, cases + ["leak"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_repeated_calls_do_not_grow_memory(op, backend, request):
    name, device = backend
    buffer = N * V * 4
    if device == "cpu":
        grown, alive = request.getfixturevalue("cpu_growth")[(op, name)]
        assert not alive, f"{op}: the logits of a finished call are still alive (a reference cycle)"
        assert grown < CALLS * buffer / 8, (f"{op}: resident memory grew by {grown / 2**20:.1f} MiB over {CALLS} "
                                            f"calls (one [N, V] buffer is {buffer / 2**20:.1f} MiB)")
        return
    call = make_call(op, name, device)
    reductions = ("none", "sum")
    for i in range(WARMUP):
        call(reductions[i % 2])
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(CALLS):
        x = call(reductions[i % 2])
        assert x() is None, f"{op}: the logits of a finished call are still alive (a reference cycle)"
    gc.collect()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown < buffer, f"{op}: {grown} bytes still allocated after {CALLS} calls"


def test_leak_check_can_fail(cpu_growth):
    """The CPU measure sees a leak of one [N, V] buffer per call."""
    grown, _ = cpu_growth["leak"]
    assert grown >= (CALLS // 4) * N * V * 4 / 2, f"a kept buffer per call grew the resident set by {grown} bytes"
