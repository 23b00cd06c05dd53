import pytest
import torch
import torch.nn.functional as F

import unlearn_ext as ue
from conftest import BACKEND_DEVICES, backend_params
from row_op_suite import OpSpec, RowOpSuite, assert_peer_criterion


class TestCrossEntropy(RowOpSuite):
    spec = OpSpec("cross_entropy", teachers=0, labels_required=True)

    def test_drop_in_for_torch(self, seed):
        logits = torch.randn(4, 6, 50)
        labels = torch.randint(0, 50, (4, 6))
        labels[0, :2] = -100
        for reduction in ("none", "sum", "mean"):
            ours = ue.cross_entropy(logits, labels, reduction=reduction)
            theirs = F.cross_entropy(logits.transpose(1, 2), labels, reduction=reduction)
            torch.testing.assert_close(ours, theirs)


class TestCrossEntropyOptions(RowOpSuite):
    """Label smoothing, z-loss and softcap together, through the whole suite."""

    spec = OpSpec("cross_entropy", teachers=0, labels_required=True,
                  params={"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 5.0})


BACKENDS = backend_params(BACKEND_DEVICES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_label_smoothing_is_torchs(backend, eps, reduction, dtype, seed):
    """Values and gradients of F.cross_entropy(label_smoothing=ε), ignored rows included
    (PyTorch leaves them out of the smoothing term and of the mean's divisor)."""
    name, device = backend
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend computes in float32 and takes no float64")
    logits = (torch.randn(9, 301, dtype=dtype) * 3).to(device)
    labels = torch.randint(0, 301, (9,), device=device)
    labels[[1, 4]] = -100
    up = torch.randn(9, dtype=dtype, device=device)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = ue.cross_entropy(a, labels, label_smoothing=eps, reduction=reduction, backend=name)
    theirs = F.cross_entropy(b, labels, label_smoothing=eps, reduction=reduction)
    ((ours * up).sum() if reduction == "none" else ours).backward()
    ((theirs * up).sum() if reduction == "none" else theirs).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.to(dtype), theirs, **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_of_a_masked_vocabulary_is_infinite_as_torchs(backend):
    name, device = backend
    logits = torch.randn(3, 20, device=device)
    logits[0, 5] = float("-inf")
    labels = torch.tensor([1, 2, 3], device=device)
    ours = ue.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none", backend=name)
    theirs = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    assert torch.isposinf(ours[0]) and torch.isposinf(theirs[0])
    torch.testing.assert_close(ours[1:], theirs[1:])


class CrossEntropyWithZLoss(torch.nn.Module):
    """Liger-Kernel's test oracle (test/transformers/test_cross_entropy.py), transcribed:
    F.cross_entropy (label smoothing, ignore_index) plus lse_square_scale·lse² on counted
    rows, reduced alike; (loss, z_loss) with return_z_loss. Run here in float64."""

    def __init__(self, lse_square_scale=0.0, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 return_z_loss=False):
        super().__init__()
        self.lse_square_scale, self.reduction, self.ignore_index = lse_square_scale, reduction, ignore_index
        self.label_smoothing, self.return_z_loss = label_smoothing, return_z_loss

    def forward(self, logits, targets):
        target_mask = targets != self.ignore_index
        ce_loss = F.cross_entropy(logits, targets, reduction=self.reduction, label_smoothing=self.label_smoothing,
                                  ignore_index=self.ignore_index)
        lse = torch.logsumexp(logits, dim=-1)
        z_loss = torch.where(target_mask, self.lse_square_scale * (lse**2), 0.0)
        if self.reduction == "mean":
            z_loss = z_loss.sum() / target_mask.sum()
        elif self.reduction == "sum":
            z_loss = z_loss.sum()
        total = ce_loss + z_loss
        return (total, z_loss) if self.return_z_loss else total


# Liger's parameter grid (test_cross_entropy.py): its vocabularies and options, its
# tolerances (atol 1e-8 with rtol 1e-6 in float32, 5e-2 in bfloat16); rows cut to 16, 4 in
# Triton's interpreter with V = 4099 (B x T 2 x 4096 and 3 x 423 there: rows do not interact). Each case: (label
# smoothing, lse_square_scale, softcap, ignore_index, reduction, return_z_loss).
LIGER_CE_CASES = (
    [(0.0, 0.0, None, -100, r, False) for r in ("sum", "mean", "none")]          # test_correctness
    + [(0.0, 0.0, None, i, r, False) for i in (2, -123) for r in ("sum", "mean", "none")]  # with_ignore_index
    + [(0.1, 0.0, None, -100, "mean", False)]                                      # with_label_smoothing
    + [(s, 0.0, None, i, "mean", False) for s, i in ((0.1, 1), (0.2, -300))]     # ... with_ignore_index
    + [(0.0, 0.0, 30.0, -100, r, False) for r in ("sum", "mean", "none")]         # with_softcap
    + [(0.0, z, None, -100, "mean", rz) for z in (1e-4, 1e-5) for rz in (True, False)]  # with_z_loss
    + [(s, z, None, i, r, rz) for rz, z in ((True, 1e-4), (False, 1e-5))
       for s, i, r in ((0.1, 42, "mean"), (0.2, -42, "sum"))]                      # z_loss_with_other_params
    + [(0.1, 1e-4, 30.0, -100, "mean", True)]                                      # all options at once
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LIGER_CE_CASES, ids=str)
def test_matches_liger_cases(backend, dtype, case, seed):
    """Values, z-losses and gradients: Liger's criterion against its oracle in float32 (as
    its test runs it), or the float64 bound where float32 cannot meet it (row_op_suite)."""
    name, device = backend
    eps, z, cap, ignore_index, reduction, return_z = case
    rows, vocab = (16, 32000) if name != "triton" else (4, 4099)
    x = torch.randn(rows, vocab).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[torch.randperm(rows, device=device)[: rows // 4]] = ignore_index
    up = torch.randn(rows, device=device)
    leaf = x.clone().requires_grad_(True)
    out = ue.cross_entropy(leaf, labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps,
                           lse_square_scale=z, softcap=cap, return_z_loss=return_z, backend=name)
    ours, ours_z = out if return_z else (out, None)
    ((ours * up).sum() if reduction == "none" else ours).backward()
    if return_z:
        assert not ours_z.requires_grad, "z_loss is for logging (as Liger's): the loss carries its gradient"
    oracle = CrossEntropyWithZLoss(lse_square_scale=z, reduction=reduction, ignore_index=ignore_index,
                                   label_smoothing=eps, return_z_loss=True)

    def run_oracle(compute_dtype):
        ref_leaf = x.detach().to(compute_dtype, copy=True).requires_grad_(True)
        capped = ref_leaf if cap is None else cap * torch.tanh(ref_leaf / cap)
        loss, z_loss = oracle(capped, labels)
        ((loss * up.to(compute_dtype)).sum() if reduction == "none" else loss).backward()
        return loss.detach(), z_loss.detach(), ref_leaf.grad

    peer, ref = run_oracle(torch.float32), run_oracle(torch.float64)
    atol, rtol = (1e-8, 1e-6) if dtype == torch.float32 else (1e-8, 5e-2)
    assert_peer_criterion("liger cross_entropy", ours, peer[0], ref[0], atol, rtol)
    if return_z:
        assert_peer_criterion("liger cross_entropy", ours_z, peer[1], ref[1], atol, rtol)
    assert_peer_criterion("liger cross_entropy", leaf.grad, peer[2], ref[2], atol, rtol)
