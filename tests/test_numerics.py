"""Numerical edge cases at the limits of precision and size:
memorised tokens (p_y → 1) in bf16, vocabularies ≥ 262144, temperatures far from 1 on huge
logits, NPO at log-ratios of ±100, and (slow) N·V > 2^31 elements, which only 64-bit
offsets reach.
"""
from __future__ import annotations

import time

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import reference

from row_op_suite import (BACKENDS, EPS, KERNEL_BACKENDS, TINY, OpSpec, assert_elementwise, check_against_reference,
                          is_interpreted)

SPECS = [OpSpec("token_logprob", 0, True), OpSpec("cross_entropy", 0, True), OpSpec("forward_kl", 1, False),
         OpSpec("reverse_kl", 1, False), OpSpec("rkld", 2, False, {"alpha": 8.0}),
         OpSpec("undial", 1, True, {"gamma": 10.0})]
SPEC_IDS = [s.name for s in SPECS]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("margin", [20.0, 40.0, 80.0])
def test_memorised_tokens_keep_their_gradient_in_bf16(backend, margin):
    """p_y = 1 − (V−1)e^−margin: below bf16's (and float32's) resolution of 1. The gradient at
    the label, 1 − p_y, must come out to bf16's relative accuracy, not 0; the others, −p_v
    (≈ e^−margin, still normal in bf16), too."""
    name, device = backend
    vocab = 1000
    logits = torch.zeros(3, vocab, dtype=torch.bfloat16, device=device)
    labels = torch.tensor([3, 500, vocab - 1], device=device)
    logits[torch.arange(3), labels] = margin
    logp64 = torch.log_softmax(logits.double(), -1)
    # 1 − p_y as the sum of the other probabilities: float64's own log_softmax rounds
    # log(1 + 999e^−40) and loses 1 − p_y past a margin of ~36 (our float32 kernels do not).
    others = torch.ones_like(logp64, dtype=torch.bool)
    others[torch.arange(3), labels] = False
    one_minus_p = torch.where(others, logp64.exp(), torch.zeros_like(logp64)).sum(-1).cpu()
    for op, sign in (("token_logprob", 1.0), ("cross_entropy", -1.0)):
        x = logits.clone().requires_grad_(True)
        out = getattr(ue, op)(x, labels, reduction="sum", backend=name)
        out.backward()
        g = x.grad.double().cpu()
        at_label = g[torch.arange(3), labels.cpu()] * sign
        assert torch.all(at_label > 0), f"{op}: the label's gradient vanished (1 − p_y = {one_minus_p.tolist()})"
        torch.testing.assert_close(at_label, one_minus_p, rtol=2 * EPS[torch.bfloat16], atol=0)
        expected = -sign * logp64.exp().cpu()
        expected[torch.arange(3), labels.cpu()] = at_label * sign  # checked above
        assert_elementwise(g, expected, torch.bfloat16, f"{op} margin {margin}", atol=TINY[torch.bfloat16])
        torch.testing.assert_close(out.double().cpu(), sign * torch.log1p(-one_minus_p).sum(),
                                   rtol=1e-5, atol=1e-45)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_memorised_tokens_through_npo(backend):
    """NPO's per-token gradient is σ(β·log-ratio)·(onehot − p): the 1 − p_y of a memorised
    token must reach it, or NPO cannot push the token down."""
    name, device = backend
    logits = torch.zeros(2, 4, 512, dtype=torch.bfloat16, device=device)
    labels = torch.randint(0, 512, (2, 4), device=device)
    logits.scatter_(-1, labels.unsqueeze(-1), 30.0)
    ref_logprob = torch.zeros(2, device=device)
    x = logits.clone().requires_grad_(True)
    ue.npo_loss(x, labels, ref_logprob, beta=0.1, backend=name).backward()
    x64 = logits.double().clone().requires_grad_(True)
    ue.npo_loss(x64, labels, ref_logprob.double(), beta=0.1, backend="torch").backward()
    at = lambda g: g.gather(-1, labels.unsqueeze(-1)).double().cpu()  # noqa: E731
    assert torch.all(at(x.grad) != 0)
    torch.testing.assert_close(at(x.grad), at(x64.grad), rtol=2 * EPS[torch.bfloat16], atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_vocabulary_of_262144_and_more(backend, spec, dtype, seed):
    vocab = 262147 if not is_interpreted(backend) else 65539
    check_against_reference(spec, backend, (2, vocab), dtype, "none", mask="vocab")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("temperature", [0.05, 20.0])
def test_temperature_far_from_one_on_huge_logits(backend, spec, temperature, seed):
    """Logits of ±1e4 divided by τ = 0.05 reach ±2e5; τ = 20 flattens them."""
    check_against_reference(spec, backend, (4, 769), torch.float32, "none", temperature=temperature, scale=1e4)
    check_against_reference(spec, backend, (4, 769), torch.bfloat16, "mean", temperature=temperature, peaked=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_npo_at_log_ratios_of_100(backend, beta, seed):
    """(2/β)·softplus(β·Δ) at Δ = ±100: no overflow, the exact limits (β·Δ for large β·Δ,
    e^(β·Δ) for very negative), gradient factor σ(β·Δ) ∈ {≈1, ≈0}, never NaN."""
    name, device = backend
    logits = torch.randn(2, 5, 301, device=device) * 3
    labels = torch.randint(0, 301, (2, 5), device=device)
    ell = reference.token_logprob(logits.double(), labels).sum(-1)
    ratio = torch.tensor([100.0, -100.0], dtype=torch.float64, device=device)
    x = logits.clone().requires_grad_(True)
    loss = ue.npo_loss(x, labels, (ell - ratio).float(), beta=beta, backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    z = beta * ratio.cpu()
    exact = (2 / beta * (torch.nn.functional.softplus(z))).mean()  # float64: e^−500 stays representable
    # float32 loses ~|ℓ|·eps in ℓ − ℓ_ref; the slope of the loss in Δ is ≤ 2.
    tol = 2 * 8 * EPS[torch.float32] * ell.abs().max().item() + 8 * EPS[torch.float32] * exact.item()
    assert abs(loss.item() - exact.item()) <= tol, f"β={beta}: {loss.item()} vs {exact.item()}"
    # Per-token gradient: (2/B)·(β/β)·σ(β·Δ_b)·(onehot − p), B = 2 sequences.
    p = torch.softmax(logits.double(), -1).cpu()
    onehot = torch.nn.functional.one_hot(labels.cpu(), 301).double()
    sigma = torch.sigmoid(z).reshape(2, 1, 1)
    slope = (sigma * (1 - sigma)).max().item()  # how far σ moves with float32's error in Δ
    assert_elementwise(x.grad, sigma * (onehot - p), torch.float32, f"npo β={beta}",
                       atol=8 * EPS[torch.float32] + beta * tol * slope + TINY[torch.float32])


def _mem_available_gib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_more_than_2_31_elements(backend):
    """N·V > 2^31 bf16 logits (4.3 GB) and their gradient (4.3 GB): rows past element 2^31
    are reached only with 64-bit offsets. Sampled rows, the last ones included, against the
    float64 reference; the fused forward-gradient path (sum) and the backward kernel (none).
    Runs wherever the device has the memory: every GPU check, and CPU machines with 12 GiB
    free (`make test` included); elsewhere it is skipped with the reason."""
    name, device = backend
    vocab, rows = 262144, 8200  # rows 8192.. start past 2^31 elements
    need_gib = 2 * rows * vocab * 2 / 2**30 + 1.5
    free_gib = (torch.cuda.mem_get_info()[0] / 2**30 if device == "cuda" else _mem_available_gib())
    if free_gib < need_gib:
        pytest.skip(f"needs {need_gib:.1f} GiB free on {device}, this machine has {free_gib:.1f} GiB")
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16, device=device)
    for r in range(0, rows, 256):
        logits[r:r + 256] = torch.randn(min(256, rows - r), vocab, generator=gen, device=device).mul_(3)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    labels[1::7] = -100
    labels[-8:] = torch.arange(vocab - 8, vocab, device=device)  # the last logits of the tensor
    sample = sorted({0, 1, 2, 4095, 8191, *range(rows - 8, rows), *torch.randint(0, rows, (8,)).tolist()})

    def check(logprob, grad, upstream, what):
        """Sampled rows: token log-prob (if given) and the gradient of upstream·token_logprob."""
        for r in sample:
            row = logits[r].detach().double().cpu()
            logp = torch.log_softmax(row, -1)
            y = int(labels[r])
            if y == -100:
                assert torch.all(grad[r] == 0), f"{what}: ignored row {r} has a gradient"
                continue
            g = upstream[r].item()
            expected = -g * logp.exp()
            expected[y] = -g * torch.expm1(logp[y])  # g·(1 − p_y)
            if logprob is not None:
                assert abs(logprob[r].item() - logp[y].item()) <= 8 * EPS[torch.float32] * row.abs().max(), (
                    f"{what}: row {r} value")
            assert_elementwise(grad[r], expected, torch.bfloat16, f"{what}: row {r} gradient",
                               atol=8 * EPS[torch.float32] * abs(g) + TINY[torch.bfloat16])

    x = logits.requires_grad_(True)
    ue.cross_entropy(x, labels, reduction="sum", backend=name).backward()  # gradient fused into the forward
    check(None, x.grad, -torch.ones(rows), "cross_entropy (sum)")
    x.grad = None
    upstream = torch.randn(rows, device=device)
    out = ue.token_logprob(x, labels, backend=name)  # the backward kernel, per-row upstream
    (out * upstream).sum().backward()
    check(out.detach().cpu(), x.grad, upstream.cpu(), "token_logprob (none)")
    print(f"N·V = {rows * vocab} bf16 on {name}-{device}: {time.perf_counter() - start:.1f} s")
