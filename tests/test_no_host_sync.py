"""No host synchronisation anywhere on the GPU path (issue 15), proven without a GPU.

The whole Python glue of every row op, sequence loss and fused-linear loss, forward and
backward, runs on ``meta`` tensors: the fake kernels (unlearn_ext/_fake_ops.py) stand in
for the CUDA ones, and the code takes the path it takes on a GPU (every branch that reads
a value on the host is CPU-only). A meta tensor holds no values, so any ``.item()``,
``bool()``, ``.tolist()`` or data-dependent shape (``nonzero``, ``unique``) raises; the
dispatch mode below also fails every op that reads a host (CPU) tensor, i.e. a copy from
the host such as ``torch.tensor(rows, device=...)`` — illegal under CUDA-graph capture.

The same calls run on a GPU under ``torch.cuda.set_sync_debug_mode("error")`` and inside
``torch.cuda.graph`` capture (skipped here: no GPU).

The masked path that GPUs take through the fused-linear losses (every row read, ignored
rows zeroed by the kernels) is also run on the CPU with values, against the eager path.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import unlearn_ext as ue
import unlearn_ext.fused_linear.sequence as fl_sequence
from unlearn_ext.fused_linear import _plan

pytestmark = pytest.mark.skipif(not ue.backends()["cpu"].available,
                                reason="the fake kernels come with the C++ op schemas")

B, T, H, V = 2, 5, 8, 33
# Ops whose result is a host value by definition (none of ours may call them on the GPU path).
SYNCING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.unique_consecutive.default",
               "aten._unique2.default", "aten.masked_select.default", "aten.item.default"}


class NoHostSync(TorchDispatchMode):
    """Fails any op that syncs with the host or reads a host tensor while the data is meta."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in SYNCING_OPS:
            raise AssertionError(f"host synchronisation: {func}")
        for x in tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                raise AssertionError(f"{func} reads a host tensor {tuple(x.shape)}: a copy from the host")
        return func(*args, **kwargs)


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(grad)


def _labels(*shape):
    return torch.empty(shape, device="meta", dtype=torch.long)


def _run(loss_fn, *leaves):
    with NoHostSync():
        loss = loss_fn()
        assert loss.is_meta
        if leaves:
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            assert all(g is None or g.is_meta for g in grads)


ROW_OPS = {
    "token_logprob": lambda x, t, y, **k: ue.token_logprob(x, y, **k),
    "cross_entropy": lambda x, t, y, **k: ue.cross_entropy(x, y, **k),
    "forward_kl": lambda x, t, y, **k: ue.forward_kl(x, t, y, **k),
    "reverse_kl": lambda x, t, y, **k: ue.reverse_kl(x, t, y, **k),
    "rkld": lambda x, t, y, **k: ue.rkld(x, t, t, y, **k),
    "undial": lambda x, t, y, **k: ue.undial(x, t, y, **k),
    "jsd": lambda x, t, y, **k: ue.jsd(x, t, y, beta=0.3, softcap=20.0, **k),
    "cross_entropy_z_loss": lambda x, t, y, **k: sum(ue.cross_entropy(x, y, label_smoothing=0.1, lse_square_scale=1e-4,
                                                                      return_z_loss=True, **k)),
}
LABELS_OPTIONAL = {"forward_kl", "reverse_kl", "rkld", "jsd"}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("op", sorted(ROW_OPS))
def test_row_ops_on_meta(op, reduction, backend):
    for with_labels in (True, False) if op in LABELS_OPTIONAL else (True,):
        for inplace in (False, True):
            leaf = _meta(B, T, V, grad=True)
            teacher = _meta(B, T, V)
            labels = _labels(B, T) if with_labels else None
            _run(lambda: ROW_OPS[op](leaf * 1.0, teacher, labels, reduction=reduction, backend=backend,
                                     inplace_backward=inplace), leaf)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sequence_losses_on_meta(backend):
    x, r = _meta(B, T, V, grad=True), _meta(B, T, V, grad=True)
    ref_logits, y, ry = _meta(B, T, V), _labels(B, T), _labels(B, T)
    ref = _meta(B)
    packed_x, packed_y, seq = _meta(B * T, V, grad=True), _labels(B * T), _labels(B * T)
    k = dict(backend=backend)
    cases = [
        (lambda: ue.sequence_logprob(x, y, **k)[0], x),
        (lambda: ue.sequence_logprob(packed_x, packed_y, seq, num_sequences=B, **k)[0], packed_x),
        (lambda: ue.ga_loss(x, y, **k), x),
        (lambda: ue.retain_loss(r, ry, ref_logits, **k), r),
        (lambda: ue.graddiff_loss(x, y, r, ry, **k), x, r),
        (lambda: ue.npo_loss(x, y, ref, **k), x),
        (lambda: ue.npo_loss(packed_x, packed_y, ref, seq, num_sequences=B, **k), packed_x),
        (lambda: ue.npo_rt_loss(x, y, ref, r, ry, **k), x, r),
        (lambda: ue.npo_kl_loss(x, y, ref, r, ry, ref_logits, **k), x, r),
        (lambda: ue.simnpo_loss(x, y, **k), x),
        (lambda: ue.simnpo_loss(packed_x, packed_y, seq, num_sequences=B, **k), packed_x),
    ]
    for fn, *leaves in cases:
        _run(fn, *leaves)


FUSED = {
    "token_logprob": lambda h, w, t, y, **k: ue.fused_linear_token_logprob(h, w, y, **k),
    "cross_entropy": lambda h, w, t, y, **k: ue.fused_linear_cross_entropy(h, w, y, **k),
    "forward_kl": lambda h, w, t, y, **k: ue.fused_linear_forward_kl(h, w, t, y, **k),
    "reverse_kl": lambda h, w, t, y, **k: ue.fused_linear_reverse_kl(h, w, t, y, **k),
    "rkld": lambda h, w, t, y, **k: ue.fused_linear_rkld(h, w, t, t, y, **k),
    "undial": lambda h, w, t, y, **k: ue.fused_linear_undial(h, w, t, y, **k),
    "jsd": lambda h, w, t, y, **k: ue.fused_linear_jsd(h, w, t, y, beta=0.3, **k),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", sorted(FUSED))
def test_fused_linear_losses_on_meta(op, backend, dtype):
    for reduction in ("none", "sum", "mean"):
        for softcap in (None, 30.0):
            hidden, weight, bias = _meta(B, T, H, dtype=dtype, grad=True), _meta(V, H, dtype=dtype, grad=True), \
                _meta(V, dtype=dtype, grad=True)
            teacher = ue.LMHeadInputs(_meta(B, T, H, dtype=dtype), _meta(V, H, dtype=dtype))
            _run(lambda: FUSED[op](hidden, weight, teacher, _labels(B, T), bias=bias, softcap=softcap,
                                   reduction=reduction, backend=backend, chunk_size=4), hidden, weight, bias)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("chunk_size", [3, 16])  # T = 5: sequences longer than a chunk (two passes), or not
def test_fused_linear_sequence_losses_on_meta(backend, chunk_size):
    h, r, w = _meta(B, T, H, grad=True), _meta(B, T, H, grad=True), _meta(V, H, grad=True)
    y, ry, ref = _labels(B, T), _labels(B, T), _meta(B)
    ref_head = ue.LMHeadInputs(_meta(B, T, H), _meta(V, H))
    packed, packed_y, seq = _meta(B * T, H, grad=True), _labels(B * T), _labels(B * T)
    k = dict(backend=backend, chunk_size=chunk_size)
    cases = [
        lambda: ue.fused_linear_sequence_logprob(h, w, y, **k)[0],
        lambda: ue.fused_linear_ga(h, w, y, **k),
        lambda: ue.fused_linear_retain(r, w, ry, ref_head, **k),
        lambda: ue.fused_linear_graddiff(h, w, y, r, ry, **k),
        lambda: ue.fused_linear_npo(h, w, y, ref, **k),
        lambda: ue.fused_linear_npo(packed, w, packed_y, ref, seq, num_sequences=B, **k),
        lambda: ue.fused_linear_npo_rt(h, w, y, ref, r, ry, **k),
        lambda: ue.fused_linear_npo_kl(h, w, y, ref, r, ry, ref_head, **k),
        lambda: ue.fused_linear_simnpo(h, w, y, **k),
        lambda: ue.fused_linear_simnpo(packed, w, packed_y, seq, num_sequences=B, **k),
    ]
    for fn in cases:
        _run(fn, h, r, w, packed)


def test_the_detector_sees_a_sync():
    """The test above would fail on today's syncs: .item(), bool(), .tolist(), nonzero and a
    tensor copied from the host all raise under NoHostSync on meta tensors."""
    x = _meta(4)
    for bad in (lambda: bool(x.sum() != 1), lambda: x.tolist(), lambda: x.nonzero(),
                lambda: x + torch.tensor(3.0), lambda: torch.tensor(4).to("meta")):
        with pytest.raises((AssertionError, RuntimeError, NotImplementedError)):
            with NoHostSync():
                bad()


# ---- the GPU path's values, on the CPU ---------------------------------------------------------------

@pytest.fixture
def gpu_path(monkeypatch):
    """Makes the fused-linear losses take the path they take off the eager CPU (every row
    read, ignored ones masked; sequence chunks from the shape) on CPU tensors."""
    for module in (_plan, fl_sequence):
        monkeypatch.setattr(module, "host_reads_are_free", lambda t: False)


@pytest.mark.parametrize("op", sorted(FUSED))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_linear_masked_path_matches_the_eager_one(op, reduction, gpu_path, seed):
    _check_masked_path(lambda h, w, t, y: FUSED[op](h, w, t, y, reduction=reduction, backend="cpu", chunk_size=4))


@pytest.mark.parametrize("name", ["npo", "simnpo", "ga", "npo_packed"])
@pytest.mark.parametrize("chunk_size", [3, 16])
def test_fused_linear_sequence_masked_path_matches_the_eager_one(name, chunk_size, gpu_path, seed):
    ref = torch.randn(B) - 20
    seq = torch.arange(B).repeat_interleave(T)
    fns = {
        "npo": lambda h, w, t, y: ue.fused_linear_npo(h, w, y, ref, backend="cpu", chunk_size=chunk_size),
        "simnpo": lambda h, w, t, y: ue.fused_linear_simnpo(h, w, y, backend="cpu", chunk_size=chunk_size),
        "ga": lambda h, w, t, y: ue.fused_linear_ga(h, w, y, backend="cpu", chunk_size=chunk_size),
        "npo_packed": lambda h, w, t, y: ue.fused_linear_npo(h.reshape(B * T, H), w, y.reshape(-1), ref, seq,
                                                             num_sequences=B, backend="cpu", chunk_size=chunk_size),
    }
    _check_masked_path(fns[name], empty_sequence=True)


def _check_masked_path(fn, empty_sequence=False):
    hidden = torch.randn(B, T, H, dtype=torch.float64).float()
    weight = torch.randn(V, H) / H**0.5
    teacher = ue.LMHeadInputs(torch.randn(B, T, H), torch.randn(V, H) / H**0.5)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    if empty_sequence:
        labels[1] = -100  # a sequence without answer tokens is left out of the means
    results, upstream = [], None
    for masked in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if masked:
            loss = fn(h, w, teacher, labels)
        else:  # the eager CPU path: undo the fixture's patch for this call
            with pytest.MonkeyPatch.context() as mp:
                for module in (_plan, fl_sequence):
                    mp.setattr(module, "host_reads_are_free", lambda t: t.device.type == "cpu")
                loss = fn(h, w, teacher, labels)
        if upstream is None:
            upstream = torch.randn(loss.shape) if loss.dim() else torch.tensor(1.3)
        results.append((loss.detach(), *torch.autograd.grad(loss, (h, w), upstream)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- on a GPU ----------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_calls(device):
    """A step of each kind on CUDA tensors: row ops (sum, mean with and without labels),
    a sequence loss, fused-linear losses."""
    x = torch.randn(B, T, V, device=device, requires_grad=True)
    t = torch.randn(B, T, V, device=device)
    y = torch.randint(0, V, (B, T), device=device)
    y[0, :2] = -100
    h = torch.randn(B, T, H, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device, requires_grad=True)
    ref = torch.zeros(B, device=device)

    def step():
        loss = (ue.cross_entropy(x, y) + ue.forward_kl(x, t) + ue.reverse_kl(x, t, y, reduction="sum")
                + ue.rkld(x, t, t) + ue.undial(x, t, y) + ue.npo_loss(x, y, ref)
                + ue.fused_linear_cross_entropy(h, w, y) + ue.fused_linear_forward_kl(h, w, (h.detach(), w.detach()))
                + ue.fused_linear_npo(h, w, y, ref))
        loss.backward()
        return loss

    return step


@cuda
def test_gpu_step_without_sync():
    step = _gpu_calls("cuda")
    step()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_gpu_step_in_cuda_graph_capture():
    step = _gpu_calls("cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on a side stream, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
