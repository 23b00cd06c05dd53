"""The CUDA kernels on a GPU, beyond the shared suite (which runs them as the ("cuda",
"cuda") backend): long rows that span many tiles with the fused gradient, rows on either
side of the on-chip stage, offsets past
2^31 elements, in-place gradients over shifted views, float64 and mixed dtypes,
torch.compile, CUDA graphs, side streams and other devices. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

import unlearn_ext as ue
from row_op_suite import IGNORE, OpSpec, assert_elementwise, check_against_reference, make_inputs, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPECS = [
    OpSpec("token_logprob", teachers=0, labels_required=True),
    OpSpec("cross_entropy", teachers=0, labels_required=True),
    OpSpec("forward_kl", teachers=1, labels_required=False),
    OpSpec("reverse_kl", teachers=1, labels_required=False),
    OpSpec("rkld", teachers=2, labels_required=False, params={"alpha": 8.0}),
    OpSpec("undial", teachers=1, labels_required=True, params={"gamma": 10.0}),
]
BACKEND = ("cuda", "cuda")


@pytest.fixture(autouse=True)
def _cuda_backend():
    status = ue.backends()["cuda"]
    if not status.available:
        pytest.skip(f"the CUDA extension is not available: {status.detail}")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("vocab", [32000, 262147])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_long_rows(spec, vocab, reduction, seed):
    """Rows of many tiles: online states per thread, the block merge, pass 2 in reverse
    from L2 (fused: mean) or the backward kernel (none)."""
    check_against_reference(spec, BACKEND, (6, vocab), torch.bfloat16, reduction)


JSD = OpSpec("jsd", teachers=1, labels_required=False, params={"beta": 0.3})
# Vocabularies on either side of the on-chip stage (csrc/cuda/row_dispatch.h: a block's
# share of shared memory, 114432 bytes on sm_90, 81664 on sm_80, holds every input's bf16
# row) and past one tile of registers (512 threads x 32 / 16 / 8 elements for one / two /
# three inputs), so that the fused forward's pass 2 reads the stage, or L2.
ON_CHIP_VOCAB = {0: 24001, 1: 12001, 2: 9001}  # by teacher count: 48 / 48 / 54 KB of bf16 rows
L2_VOCAB = {0: 60001, 1: 30001, 2: 20001}  # 120 / 120 / 120 KB: past the stage on sm_80 and sm_90


@pytest.mark.parametrize("spec", SPECS + [JSD], ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["on_chip", "l2"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_on_chip_and_l2_rows(spec, path, reduction, seed):
    """Rows that the fused forward keeps in shared memory between its passes, and rows that
    it re-reads from L2 (reduction mean: the fused forward; none: the forward, and the
    backward kernel, and JSD's second sum from the stage or L2)."""
    vocab = (ON_CHIP_VOCAB if path == "on_chip" else L2_VOCAB)[spec.teachers]
    check_against_reference(spec, BACKEND, (6, vocab), torch.bfloat16, reduction)
    if spec.teachers == 0:  # float32: twice the bytes, half the elements on chip
        check_against_reference(spec, BACKEND, (6, vocab // 2), torch.float32, reduction)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inplace_over_shifted_view(spec, reduction, seed):
    """The gradient written over logits[:, :-1] of a [B, T, V] buffer; the last position
    stays as it was."""
    logits, teachers, labels = make_inputs(spec, (3, 9, 4099), torch.bfloat16, "cuda")
    labels, tv = labels[:, 1:], [t[:, :-1] for t in teachers]
    upstream = torch.randn(3, 8, device="cuda")
    ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), logits[:, :-1].double(),
                            [t.double() for t in tv], labels, reduction, upstream.double())
    leaf = logits.clone().requires_grad_(True)
    buffer = leaf * 1.0
    out = spec(buffer[:, :-1], tv, labels, backend="cuda", reduction=reduction, inplace_backward=True)
    (out * upstream).sum().backward() if reduction == "none" else out.backward()
    assert_elementwise(out.detach(), ref_out, torch.float32, "value", atol=1e-5)
    assert_elementwise(leaf.grad[:, :-1], ref_grad, torch.bfloat16, "gradient", atol=1e-6)
    assert torch.equal(buffer.detach()[:, :-1], leaf.grad[:, :-1])
    assert torch.equal(buffer.detach()[:, -1], logits[:, -1])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("layout", ["misaligned_base", "mixed_dtype", "float64"])
def test_unaligned_rows_mixed_dtypes_float64(spec, layout, seed):
    """A peeled head (x[:, 1:]), the element-by-element kernels (a float32 teacher for a
    bfloat16 student), and float64 computed in double."""
    dtype = torch.float64 if layout == "float64" else torch.bfloat16
    logits, teachers, labels = make_inputs(spec, (5, 2051), dtype, "cuda")
    if layout == "misaligned_base":
        logits, teachers = logits[:, 1:], [t[:, 1:] for t in teachers]
        labels = torch.where(labels == IGNORE, labels, labels % 2050)
    if layout == "mixed_dtype":
        teachers = [t.float() for t in teachers]
    upstream = torch.randn(5, device="cuda", dtype=torch.float64)
    for reduction in ("none", "mean"):
        out, grad = run(lambda *a, **k: spec(*a, backend="cuda", **k), logits, teachers, labels, reduction,
                        upstream if dtype == torch.float64 else upstream.float())
        ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), logits.double(),
                                [t.double() for t in teachers], labels, reduction, upstream)
        tight = dtype == torch.float64
        assert_elementwise(out, ref_out, torch.float64 if tight else torch.float32, "value",
                           atol=1e-13 if tight else 1e-5)
        assert_elementwise(grad, ref_grad, dtype, "gradient", atol=1e-15 if tight else 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[2]], ids=lambda s: s.name)
def test_offsets_past_2_31_elements(spec):
    """N·V > 2^31: the last rows (64-bit offsets) against the reference on those rows."""
    torch.manual_seed(0)
    vocab, rows = 131072, 2**31 // 131072 + 3
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    teachers = [torch.randn_like(logits) for _ in range(spec.teachers)]
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    x = logits.requires_grad_(True)
    reduction = "sum" if spec.name == "cross_entropy" else "none"  # fused forward, backward kernel
    out = spec(x, teachers, labels, backend="cuda", reduction="none")
    out_r = spec(x, teachers, labels, backend="cuda", reduction=reduction)
    (out_r.sum() if reduction == "none" else out_r).backward()
    tail = slice(rows - 4, rows)
    t_tail = [t[tail].double() for t in teachers]
    ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), logits[tail].detach().double(), t_tail,
                            labels[tail], "none", torch.ones(4, device="cuda", dtype=torch.float64))
    assert_elementwise(out[tail].detach(), ref_out, torch.float32, "value", atol=1e-5)
    assert_elementwise(x.grad[tail], ref_grad, torch.bfloat16, "gradient", atol=1e-6)


def test_torch_compile_without_graph_breaks(seed, monkeypatch):
    monkeypatch.delenv("UNLEARN_EXT_POISON", raising=False)  # compile as users run it (issue 12.2)
    logits, (teacher,), labels = make_inputs(SPECS[3], (4, 7, 1031), torch.bfloat16, "cuda")

    def loss_fn(x, t, y):
        return ue.cross_entropy(x, y, backend="cuda") + 0.5 * ue.reverse_kl(x, t, y, reduction="sum", backend="cuda")

    compiled = torch.compile(loss_fn, fullgraph=True)
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_eager, loss_compiled = loss_fn(x1, teacher, labels), compiled(x2, teacher, labels)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_cuda_graph_capture_and_replay(seed):
    """Forward and backward captured once, replayed on new data: no host synchronisation."""
    spec = SPECS[1]
    logits, _, labels = make_inputs(spec, (64, 4099), torch.bfloat16, "cuda")
    x = logits.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        for _ in range(2):
            x.grad = None
            ue.cross_entropy(x, labels, backend="cuda").backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = ue.cross_entropy(x, labels, backend="cuda")
        loss.backward()
    fresh, _, _ = make_inputs(spec, (64, 4099), torch.bfloat16, "cuda")
    with torch.no_grad():
        x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_grad = run(lambda *a, **k: spec(*a, backend="torch", **k), fresh.double(), [], labels, "mean",
                            None)
    assert_elementwise(loss.detach(), ref_out, torch.float32, "value", atol=1e-5)
    assert_elementwise(x.grad, ref_grad, torch.bfloat16, "gradient", atol=1e-6)


def test_side_stream_and_other_device(seed):
    """Kernels run on the current stream of the logits' device."""
    spec = SPECS[2]
    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    for device in devices:
        logits, teachers, labels = make_inputs(spec, (16, 3001), torch.bfloat16, device)
        expected = spec(logits, teachers, labels, backend="torch", reduction="none")
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            out = spec(logits, teachers, labels, backend="cuda", reduction="none")
        stream.synchronize()
        assert out.device == logits.device
        torch.testing.assert_close(out, expected, rtol=2e-5, atol=1e-5)
