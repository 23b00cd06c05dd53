"""Fused-linear losses: the losses of unlearn_ext.ops on an LM head's hidden states and
weight, computed chunk by chunk so that the [N, V] logits are never held (DESIGN.md,
"Fused-linear variants"). See losses.py for the common arguments."""
from ._chunked import default_chunk_rows
from ._inputs import LMHeadInputs, shift_labels
from .losses import (fused_linear_cross_entropy, fused_linear_forward_kl, fused_linear_jsd, fused_linear_reverse_kl,
                     fused_linear_rkld, fused_linear_token_logprob, fused_linear_undial)
from .sequence import (fused_linear_ga, fused_linear_graddiff, fused_linear_npo, fused_linear_npo_kl,
                       fused_linear_npo_rt, fused_linear_retain, fused_linear_sequence_logprob, fused_linear_simnpo)

__all__ = [
    "LMHeadInputs", "shift_labels", "default_chunk_rows",
    "fused_linear_token_logprob", "fused_linear_cross_entropy", "fused_linear_forward_kl", "fused_linear_reverse_kl",
    "fused_linear_rkld", "fused_linear_undial", "fused_linear_jsd",
    "fused_linear_sequence_logprob", "fused_linear_ga", "fused_linear_retain", "fused_linear_graddiff",
    "fused_linear_npo", "fused_linear_npo_rt", "fused_linear_npo_kl", "fused_linear_simnpo",
]
