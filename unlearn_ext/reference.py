"""Plain-PyTorch reference of every op: the test oracle and the ``torch`` backend.

Each row op returns the per-row value with the shape of ``logits.shape[:-1]`` (0 on ignored
rows); ``reduce`` applies a reduction. Math runs in float32, or float64 for float64 inputs
(``compute_dtype`` overrides it: the tests use it to measure PyTorch's own error in bf16).
Gradients come from autograd. The formulas are written so that masked (``-inf``) logits
give exact zeros (0 · log 0 = 0) and no NaN reaches a gradient through an unused branch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _cdtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_mask(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """True on rows that count."""
    if labels is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return labels != ignore_index


def softcap_logits(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2's logit soft-capping c·tanh(x / c); None or 0: x unchanged. Masked logits
    (-inf) stay masked."""
    if not softcap:
        return x
    return torch.where(x == float("-inf"), x, softcap * torch.tanh(x / softcap))


def _log_softmax(x: torch.Tensor, temperature: float, dtype: torch.dtype, softcap: float | None = None) -> torch.Tensor:
    return F.log_softmax(softcap_logits(x.to(dtype), softcap) / temperature, dim=-1)


def _masked_sum(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_v weight * value over the vocabulary, with 0 where weight is 0 (even if value is
    inf); a NaN weight stays NaN."""
    used = weight != 0
    safe_value = torch.where(used, value, torch.zeros_like(value))
    return torch.where(used, weight * safe_value, torch.zeros_like(weight)).sum(-1)


def token_logprob(logits, labels, *, ignore_index=IGNORE_INDEX, temperature=1.0, softcap=None, compute_dtype=None):
    """log softmax(logits / τ)[label] per row (logits softcapped first when softcap is given)."""
    mask = _row_mask(logits, labels, ignore_index)
    logp = _log_softmax(logits, temperature, _cdtype(logits, compute_dtype), softcap)
    picked = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def cross_entropy(logits, labels, *, ignore_index=IGNORE_INDEX, temperature=1.0, label_smoothing=0.0,
                  lse_square_scale=0.0, softcap=None, compute_dtype=None):
    """-log softmax(logits / τ)[label] per row; with label smoothing ε (PyTorch's),
    (1 − ε)·CE + ε·mean_v(−log p_v); with z-loss, + lse_square_scale·lse² (Liger's)."""
    mask = _row_mask(logits, labels, ignore_index)
    logp = _log_softmax(logits, temperature, _cdtype(logits, compute_dtype), softcap)
    ce = -logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        ce = (1 - label_smoothing) * ce - label_smoothing * logp.mean(-1)
    if lse_square_scale:
        ce = ce + z_loss(logits, labels, lse_square_scale=lse_square_scale, ignore_index=ignore_index,
                         temperature=temperature, softcap=softcap, compute_dtype=compute_dtype)
    return torch.where(mask, ce, torch.zeros_like(ce))


def z_loss(logits, labels, *, lse_square_scale, ignore_index=IGNORE_INDEX, temperature=1.0, softcap=None,
           compute_dtype=None):
    """The z-loss per row, lse_square_scale·logsumexp(logits / τ)² (0 on ignored rows)."""
    x = softcap_logits(logits.to(_cdtype(logits, compute_dtype)), softcap) / temperature
    z = lse_square_scale * torch.logsumexp(x, -1) ** 2
    return torch.where(_row_mask(logits, labels, ignore_index), z, torch.zeros_like(z))


def forward_kl(logits, teacher_logits, labels=None, *, ignore_index=IGNORE_INDEX, temperature=1.0,
               softcap=None, compute_dtype=None):
    """KL(q || p) per row, q = softmax(teacher / τ), p = softmax(logits / τ)."""
    dtype = _cdtype(logits, compute_dtype)
    logp = _log_softmax(logits, temperature, dtype, softcap)
    logq = _log_softmax(teacher_logits.detach(), temperature, dtype)
    kl = _masked_sum(logq.exp(), logq - logp)
    return torch.where(_row_mask(logits, labels, ignore_index), kl, torch.zeros_like(kl))


def reverse_kl(logits, teacher_logits, labels=None, *, ignore_index=IGNORE_INDEX, temperature=1.0,
               softcap=None, compute_dtype=None):
    """KL(p || q) per row."""
    dtype = _cdtype(logits, compute_dtype)
    logp = _log_softmax(logits, temperature, dtype, softcap)
    logq = _log_softmax(teacher_logits.detach(), temperature, dtype)
    p = logp.exp()
    used = p != 0
    zero = torch.zeros_like(logp)
    kl = _masked_sum(p, torch.where(used, logp, zero) - torch.where(used, logq, zero))
    return torch.where(_row_mask(logits, labels, ignore_index), kl, torch.zeros_like(kl))


def rkld_teacher(original_logits, augmented_logits, alpha):
    """The RKLD teacher o − α·relu(a − o); masked original logits stay masked."""
    o, a = original_logits.detach(), augmented_logits.detach()
    neg_inf = torch.full_like(o, float("-inf"))
    return torch.where(o == float("-inf"), neg_inf, o - alpha * torch.relu(a - o))


def rkld(logits, original_logits, augmented_logits, labels=None, *, alpha=8.0, ignore_index=IGNORE_INDEX,
         temperature=1.0, softcap=None, compute_dtype=None):
    """Reverse KL to the RKLD teacher built from original and augmented logits."""
    dtype = _cdtype(logits, compute_dtype)
    teacher = rkld_teacher(original_logits.to(dtype), augmented_logits.to(dtype), alpha)
    return reverse_kl(logits, teacher, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                      compute_dtype=compute_dtype)


def undial(logits, teacher_logits, labels, *, gamma=10.0, ignore_index=IGNORE_INDEX, temperature=1.0,
           softcap=None, compute_dtype=None):
    """Soft-label cross entropy to softmax((teacher − γ·onehot(label)) / τ)."""
    dtype = _cdtype(logits, compute_dtype)
    mask = _row_mask(logits, labels, ignore_index)
    onehot = F.one_hot(torch.where(mask, labels, 0), logits.shape[-1]).to(dtype)
    logq = _log_softmax(teacher_logits.detach().to(dtype) - gamma * onehot, temperature, dtype)
    logp = _log_softmax(logits, temperature, dtype, softcap)
    ce = _masked_sum(logq.exp(), -logp)
    return torch.where(mask, ce, torch.zeros_like(ce))


def _log_mix(x, g, gc):
    """log((1 − g) + g·eˣ) for 0 < g < 1 (gc = 1 − g), accurate relative to its own size
    (csrc/common/row_math.h, log_mix, by the same branches); every branch's input is kept
    in its domain so that autograd sees no inf or NaN from the branches not taken."""
    big, small = x > 80, x < -80
    mid = x.clamp(-80, 80)
    y = g * torch.expm1(mid)
    near = y >= -0.5
    out_big = x.clamp(min=80) + torch.log(g + gc * torch.exp(-x.clamp(min=80)))
    out_small = torch.log(gc + g * torch.exp(x.clamp(max=-80)))
    out_near = torch.log1p(torch.where(near, y, torch.zeros_like(y)))
    out_far = mid + torch.log1p(gc * torch.expm1(-mid))
    return torch.where(big, out_big, torch.where(near, out_near, torch.where(small, out_small, out_far)))


def jsd(logits, teacher_logits, labels=None, *, beta=0.5, ignore_index=IGNORE_INDEX, temperature=1.0, softcap=None,
        compute_dtype=None):
    """The generalised JSD scaled to be continuous in β: with m = β·q + (1 − β)·p,
    [β·KL(q‖m) + (1 − β)·KL(p‖m)] / (β(1 − β)); β = 0 is forward_kl, β = 1 reverse_kl
    (their limits). Per element q·log(q/m)/(1 − β) + p·log(p/m)/β, the logs by _log_mix."""
    if beta == 0:
        return forward_kl(logits, teacher_logits, labels, ignore_index=ignore_index, temperature=temperature,
                          softcap=softcap, compute_dtype=compute_dtype)
    if beta == 1:
        return reverse_kl(logits, teacher_logits, labels, ignore_index=ignore_index, temperature=temperature,
                          softcap=softcap, compute_dtype=compute_dtype)
    dtype = _cdtype(logits, compute_dtype)
    logp = _log_softmax(logits, temperature, dtype, softcap)
    logq = _log_softmax(teacher_logits.detach(), temperature, dtype)
    p, q = logp.exp(), logq.exp()
    both_zero = (p == 0) & (q == 0)
    d = torch.where(both_zero, torch.zeros_like(logp), logq - logp)  # log q − log p
    zero = torch.zeros_like(d)
    pb = torch.where(p == 0, zero, -p * _log_mix(d, beta, 1 - beta) / beta)
    vq = torch.where(q == 0, zero, -q * _log_mix(-d, 1 - beta, beta) / (1 - beta))
    value = (vq + pb).sum(-1)
    return torch.where(_row_mask(logits, labels, ignore_index), value, torch.zeros_like(value))


ROW_OPS = {
    "token_logprob": token_logprob,
    "cross_entropy": cross_entropy,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "rkld": rkld,
    "undial": undial,
    "jsd": jsd,
}


def reduce(values, labels=None, *, ignore_index=IGNORE_INDEX, reduction="mean"):
    """none: per row; sum; mean over counted rows (0 when no row counts)."""
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = values.numel() if labels is None else (labels != ignore_index).sum()
    return total / torch.clamp(torch.as_tensor(count, device=values.device), min=1)


# ---- sequence losses (DESIGN.md: "Sequence losses") --------------------------------------------
# The [B]-level formulas; unlearn_ext.ops.sequence applies them to token log-probs from any
# backend (backend="torch" makes the whole loss plain PyTorch).


def mean_over_sequences(per_seq, counts):
    """Mean over the sequences that have at least one answer token (0 when none has)."""
    used = counts > 0
    return torch.where(used, per_seq, torch.zeros_like(per_seq)).sum() / used.sum().clamp(min=1)


def npo_per_sequence(logprob, ref_logprob, beta):
    """NPO (arXiv 2404.05868): (2/β)·softplus(β(ℓ_b − ℓ_b^ref))."""
    return 2.0 / beta * F.softplus(beta * (logprob - ref_logprob.detach().to(logprob.dtype)))


def simnpo_per_sequence(logprob, counts, beta, delta):
    """SimNPO (arXiv 2410.07163): (2/β)·softplus(−β(NLL_b/|y_b| − δ))."""
    mean_nll = -logprob / counts.clamp(min=1)
    return 2.0 / beta * F.softplus(-beta * (mean_nll - delta))
