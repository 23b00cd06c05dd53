"""unlearn_ext: fused loss kernels for LLM unlearning.

    import unlearn_ext as ue
    loss = ue.cross_entropy(logits, labels)            # drop-in, one pass per row
    kl = ue.rkld(logits, original_logits, augmented_logits, labels, alpha=8.0)
    ue.backends()                                      # which backends this install has
    loss = ue.fused_linear_cross_entropy(hidden, lm_head.weight, labels)  # never holds [N, V]
"""
from . import reference
from ._backends import backends
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all
from .fused_linear import *  # noqa: F401,F403
from .fused_linear import __all__ as _fused_linear_all

__version__ = "0.1.0"
__all__ = ["backends", "reference", *_ops_all, *_fused_linear_all]
