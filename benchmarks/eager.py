"""Each row op as a PyTorch user writes it (log_softmax, gather, kl_div, …), mean over rows:
the "eager" side of the CPU benchmarks. No row is ignored here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALPHA, GAMMA = 8.0, 10.0  # RKLD's α and UnDIAL's γ (the papers' defaults)


def eager(op, x, teachers, y):
    """The loss as plain PyTorch code, mean over rows (no row is ignored here)."""
    if op == "token_logprob":
        return torch.log_softmax(x, -1).gather(-1, y[:, None]).mean()
    if op == "cross_entropy":
        return F.cross_entropy(x, y)
    if op == "forward_kl":
        return F.kl_div(torch.log_softmax(x, -1), torch.log_softmax(teachers[0], -1), log_target=True,
                        reduction="batchmean")
    if op == "undial":
        t = teachers[0].clone()
        t[torch.arange(len(y)), y] -= GAMMA
        return -(torch.softmax(t, -1) * torch.log_softmax(x, -1)).sum(-1).mean()
    t = teachers[0] if op == "reverse_kl" else teachers[0] - ALPHA * torch.relu(teachers[1] - teachers[0])
    logp, logq = torch.log_softmax(x, -1), torch.log_softmax(t, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()
