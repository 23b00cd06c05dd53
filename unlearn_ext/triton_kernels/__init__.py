"""Triton kernels of the row ops (backend "triton"): token_logprob, cross_entropy,
forward_kl, reverse_kl, rkld and undial, forward and backward.

They run on CUDA tensors, or on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1
is set before this module is imported (how the CPU-only CI tests them). Installed inside
the unlearn_ext namespace: a top-level `triton_kernels` belongs to another distribution.

    row_math.py     per-block math of every op (a port of csrc/common/row_math.h)
    row_kernels.py  the forward and backward kernels
    configs.py      block sizes and warps per device
    launch.py       KERNELS, the object unlearn_ext._backends calls
"""
from .launch import KERNELS, TritonRowKernels

__all__ = ["KERNELS", "TritonRowKernels"]
