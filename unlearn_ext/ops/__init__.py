"""The loss ops: row ops over vocabulary-sized logits and the sequence losses built on them."""
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .forward_kl import ForwardKLLoss, forward_kl
from .jsd import JSDLoss, jsd
from .reverse_kl import ReverseKLLoss, reverse_kl
from .rkld import RKLDLoss, rkld
from .sequence import (ga_loss, graddiff_loss, npo_kl_loss, npo_loss, npo_rt_loss, retain_loss, sequence_logprob,
                       simnpo_loss)
from .token_logprob import TokenLogProb, token_logprob
from .undial import UnDIALLoss, undial

__all__ = [
    "token_logprob", "cross_entropy", "forward_kl", "reverse_kl", "rkld", "undial", "jsd",
    "TokenLogProb", "CrossEntropyLoss", "ForwardKLLoss", "ReverseKLLoss", "RKLDLoss", "UnDIALLoss", "JSDLoss",
    "sequence_logprob", "ga_loss", "graddiff_loss", "retain_loss", "npo_loss", "npo_rt_loss", "npo_kl_loss",
    "simnpo_loss",
]
