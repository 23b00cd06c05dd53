"""ue.jsd: the generalised JSD, scaled by 1/(β(1 − β)) so that β = 0 is forward_kl and
β = 1 reverse_kl, continuously (ops/jsd.py). The row-op suite at β = 0.3 and at both ends
of the open interval; continuity in β; Liger-Kernel's JSD (a transcription of its formula,
test cases ported from its test/transformers/test_jsd.py) times β(1 − β)."""
import pytest
import torch

import unlearn_ext as ue
from conftest import BACKEND_DEVICES, backend_params
from row_op_suite import OpSpec, RowOpSuite, assert_peer_criterion, make_inputs

BACKENDS = backend_params(BACKEND_DEVICES)


class TestJSD(RowOpSuite):
    spec = OpSpec("jsd", teachers=1, labels_required=False, params={"beta": 0.3})


def liger_jsd(student_logits, teacher_logits, beta, labels=None, ignore_index=-100):
    """Liger-Kernel's LigerJSD (src/liger_kernel/ops/jsd.py, _jsd_kernel), transcribed:
    X = student log-probs, Y = teacher log-probs, P = exp(Y), Q = exp(X);
    β = 0: Σ P (Y − X); β = 1: Σ Q (X − Y); else M = βP + (1 − β)Q,
    Σ β P (Y − log M) + (1 − β) Q (X − log M); the sum over counted rows divided by their
    number (Liger's batchmean over non-ignored tokens). In the inputs' dtype."""
    x = student_logits.log_softmax(-1)
    y = teacher_logits.log_softmax(-1)
    p, q = y.exp(), x.exp()
    if beta == 0:
        rows = (p * (y - x)).sum(-1)
    elif beta == 1:
        rows = (q * (x - y)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = (beta * p * (y - log_m) + (1 - beta) * q * (x - log_m)).sum(-1)
    mask = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    return torch.where(mask, rows, torch.zeros_like(rows)).sum() / mask.sum().clamp(min=1)


# test/transformers/test_jsd.py of Liger-Kernel: its shapes (B, T, V), dtypes with their
# tolerances, betas and ignore indices.
LIGER_SHAPES = [(2, 1024, 3200), (41, 401, 1271)]
LIGER_DTYPES = [(torch.bfloat16, 1e-7, 5e-2), (torch.float32, 1e-7, 1e-6), (torch.float16, 1e-3, 1e-3)]
LIGER_BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,atol,rtol", LIGER_DTYPES, ids=str)
@pytest.mark.parametrize("beta", LIGER_BETAS)
@pytest.mark.parametrize("ignore_index", [None, 2, 42])
def test_matches_liger_times_beta_one_minus_beta(backend, shape, dtype, atol, rtol, beta, ignore_index, seed):
    """Ours · β(1 − β) is Liger's value (β = 0, 1: equal), the gradient too, by Liger's
    criterion against its float32 oracle (or the float64 bound, row_op_suite). Rows cut
    to 8 (4 in Triton's interpreter): rows do not interact."""
    name, device = backend
    rows, vocab = (8 if name != "triton" else 4), shape[-1]
    x = torch.randn(rows, vocab).to(dtype).to(device)
    t = torch.randn(rows, vocab).to(dtype).to(device)
    labels = None
    if ignore_index is not None:
        labels = torch.randint(0, vocab, (rows,), device=device)
        labels[torch.randperm(rows, device=device)[: rows // 4]] = ignore_index
    leaf = x.clone().requires_grad_(True)
    scale = beta * (1 - beta) if 0 < beta < 1 else 1.0
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    ours = ue.jsd(leaf, t, labels, beta=beta, backend=name, **kw) * scale
    ours.backward()
    results = []
    for compute_dtype in (torch.float32, torch.float64):  # Liger's test: its torch JSD in float32
        ref_leaf = x.detach().to(compute_dtype, copy=True).requires_grad_(True)
        theirs = liger_jsd(ref_leaf, t.to(compute_dtype), beta, labels, **kw)
        theirs.backward()
        results.append((theirs.detach(), ref_leaf.grad))
    for k in range(2):  # value, gradient
        got = ours.detach() if k == 0 else leaf.grad
        assert_peer_criterion("liger jsd", got, results[0][k], results[1][k], atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_at_both_ends(backend, seed):
    """β = 1e-6 is forward_kl and β = 1 − 1e-6 reverse_kl up to O(β·(KL + χ²)) (the next
    term of the expansion) plus float32 rounding; Liger's value there is ~1e-6·KL (it jumps
    at the ends). And the gap shrinks as β does."""
    name, device = backend
    spec = OpSpec("jsd", teachers=1, labels_required=False)
    logits, (teacher,), labels = make_inputs(spec, (6, 257), torch.float32, device, scale=1.0)
    fkl = ue.forward_kl(logits, teacher, labels, backend=name, reduction="none").double()
    rkl = ue.reverse_kl(logits, teacher, labels, backend=name, reduction="none").double()
    lp, lq = logits.double().log_softmax(-1), teacher.double().log_softmax(-1)
    chi_q = ((2 * lq - lp).exp().sum(-1) - 1)  # χ²(q‖p)
    chi_p = ((2 * lp - lq).exp().sum(-1) - 1)  # χ²(p‖q)
    for beta, end, chi in ((1e-6, fkl, chi_q), (1 - 1e-6, rkl, chi_p)):
        ours = ue.jsd(logits, teacher, labels, beta=beta, backend=name, reduction="none").double()
        step = min(beta, 1 - beta)
        bound = 10 * step * (end + chi).cpu() + 2e-6 * (1 + end.abs().cpu())
        assert torch.all((ours - end).abs().cpu() <= bound), f"β={beta}: {ours} vs {end}"
    gaps = [(ue.jsd(logits, teacher, labels, beta=b, backend=name, reduction="sum").double()
             - fkl.sum()).abs().item() for b in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2], gaps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_ends_are_exactly_the_kls(backend, beta, seed):
    name, device = backend
    s, t = torch.randn(5, 33, device=device), torch.randn(5, 33, device=device)
    kl = ue.forward_kl if beta == 0 else ue.reverse_kl
    assert torch.equal(ue.jsd(s, t, beta=beta, backend=name, reduction="none"),
                       kl(s, t, backend=name, reduction="none"))


def test_symmetric_at_one_half(seed):
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    torch.testing.assert_close(ue.jsd(s, t, beta=0.5, backend="cpu", reduction="none"),
                               ue.jsd(t, s, beta=0.5, backend="cpu", reduction="none"))


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "half"])
def test_bad_beta(beta):
    s = torch.randn(2, 5)
    with pytest.raises((ValueError, TypeError), match="beta"):
        ue.jsd(s, s.clone(), beta=beta)
