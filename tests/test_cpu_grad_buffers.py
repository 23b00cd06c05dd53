"""The C++ CPU kernels as users run them: their row loop runs on every intra-op thread, and
their gradient buffers (csrc/cpu/grad_pool.h) reuse the memory of a freed gradient.

A reused buffer holds the previous call's gradient, so the kernels must write every element
of it: each op, both gradient paths (the fused forward for "mean", the backward kernel for
"none"), with masked blocks, temperature and softcap, is compared with the float64
reference on a buffer that was filled with NaN before it was freed. A gradient still held
is never handed out again, and the memory kept idle stays within the stated bound."""
from __future__ import annotations

import os
import resource

import pytest
import torch

import unlearn_ext as ue

from row_op_suite import OpSpec, check_outputs

_C = pytest.importorskip("unlearn_ext._C")
pytestmark = pytest.mark.as_users_run  # the buffers users get, not the tests' NaN-filled ones

V = 32768 + 5  # not a multiple of the kernels' block
TEACHERS = {"token_logprob": 0, "cross_entropy": 0, "forward_kl": 1, "reverse_kl": 1, "rkld": 2, "undial": 1,
            "jsd": 1}
OPS = list(TEACHERS)


@pytest.fixture(autouse=True)
def empty_pool():
    _C.release_grad_pool()
    yield
    _C.release_grad_pool()


def _inputs(op, dtype):
    rows = -(-(4 << 20) // (V * dtype.itemsize))  # the fewest rows that make a pooled buffer
    x = torch.randn(rows, V, dtype=torch.float64) * 4
    if op != "jsd":  # (JSD keeps its own gradient pass; the reference has NaN for masked rows)
        x[2, :2048] = float("-inf")  # two whole blocks masked: their exponentials are all 0
    x[3] -= 300.0  # a row far below 0: the per-block factors stay finite
    teachers = [torch.randn(rows, V, dtype=torch.float64) * 4 for _ in range(TEACHERS[op])]
    labels = torch.randint(2048, V, (rows,))
    labels[::7] = -100
    return x.to(dtype), [t.to(dtype) for t in teachers], labels


def _spec(op, softcap):
    params = {"alpha": 8.0} if op == "rkld" else {"gamma": 10.0} if op == "undial" else {}
    if softcap:
        params["softcap"] = softcap
    return OpSpec(op, TEACHERS[op], op in ("token_logprob", "cross_entropy", "undial"), params)


def _run(op, x, labels, reduction="mean"):
    leaf = x.detach().requires_grad_(True)
    getattr(ue, op)(leaf, labels, reduction=reduction, backend="cpu").sum().backward()
    return leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("op", OPS)
def test_a_reused_buffer_is_written_everywhere(op, reduction, dtype, seed):
    """The row-op suite's bounds (row_op_suite.check_outputs), on a buffer that held NaN."""
    temperature, softcap = (1.0, None) if op in ("cross_entropy", "reverse_kl") else (1.7, 30.0)
    spec = _spec(op, softcap)
    inputs = _inputs(op, dtype)
    upstream = torch.randn(inputs[0].shape[0], dtype=torch.float64)
    _, first = check_outputs(spec, ("cpu", "cpu"), *inputs, reduction, upstream, temperature=temperature)
    ptr = first.data_ptr()
    first.fill_(float("nan"))  # what a kernel that skips an element would leave behind
    del first
    assert _C.grad_pool_stats()[0] == 1
    _, grad = check_outputs(spec, ("cpu", "cpu"), *_inputs(op, dtype), reduction, upstream, temperature=temperature)
    assert grad.data_ptr() == ptr, "the freed gradient's memory was not reused"


def test_the_second_call_takes_no_page_faults(seed):
    x, _, labels = _inputs("cross_entropy", torch.float32)
    pages = x.numel() * 4 // 4096
    _run("cross_entropy", x, labels)  # maps the buffer; freed on return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grad = _run("cross_entropy", x, labels)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < pages // 8, f"{faults} minor page faults for a {pages}-page gradient"
    assert torch.isfinite(grad).all()


def test_a_held_gradient_is_not_handed_out_again(seed):
    x, _, labels = _inputs("cross_entropy", torch.float32)
    held = _run("cross_entropy", x, labels)
    copy = held.clone()
    other = _run("cross_entropy", x * 0.5, labels)
    assert other.data_ptr() != held.data_ptr()
    assert torch.equal(held, copy)


def test_memory_kept_idle_is_bounded():
    mib = 1 << 20
    a = _C.grad_buffer([4 * mib], torch.uint8)
    b = _C.grad_buffer([8 * mib], torch.uint8)
    del a, b
    assert _C.grad_pool_stats() == (2, 12 * mib)
    # Fits neither (a block may be at most a quarter larger than asked): the free list is
    # trimmed, least recently freed first, until it holds no more than the request.
    c = _C.grad_buffer([6 * mib], torch.uint8)
    assert _C.grad_pool_stats() == (0, 0)
    d = _C.grad_buffer([5 * mib], torch.uint8)  # rounded to 6 MiB (2 MiB pages)
    del c
    e = _C.grad_buffer([5 * mib + 1], torch.uint8)  # takes c's 6 MiB block
    assert _C.grad_pool_stats() == (0, 0)
    del d, e
    live = [_C.grad_buffer([(4 + 2 * k) * mib], torch.uint8) for k in range(8)]
    del live
    assert _C.grad_pool_stats()[0] == 4


def test_small_buffers_are_plain_tensors():
    t = _C.grad_buffer([4, 1000], torch.float32)
    assert t.shape == (4, 1000) and t.dtype == torch.float32 and _C.grad_pool_stats() == (0, 0)
    del t
    assert _C.grad_pool_stats() == (0, 0)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: a single intra-op thread")
def test_the_row_loop_runs_on_every_thread():
    """at::parallel_for is a header template: built without OpenMP it runs every row on the
    calling thread (the kernels then used one core of two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _C.row_threads(64) == 2
    finally:
        torch.set_num_threads(threads)
