"""The backward of a gradient written during the forward: scale it by the upstream gradient,
without a host synchronisation on GPUs.

The forward (fused path) wrote the gradient for an upstream gradient of 1, and 1 is what a
loss's backward nearly always gets; then nothing is to be done. On the CPU, reading the
upstream gradient costs nothing and decides on the host. Elsewhere the backend's scale
kernel reads it from device memory and returns at once when it is 1 (CUDA graphs,
torch.compile and eager calls alike); the torch reference multiplies.
"""
from __future__ import annotations

import torch

from ._checks import tracing


def scale_grad_(kernels, grad: torch.Tensor, g: torch.Tensor) -> bool:
    """grad *= g in place, skipped when g == 1; returns False only when it is known on the
    host that grad is unchanged (a second backward through the same graph is then safe)."""
    if grad.device.type == "cpu" and not tracing():
        if bool(g != 1):
            grad.mul_(g)
            return True
        return False
    if kernels is not None:
        kernels.scale_grad(grad, g)
    else:
        grad.mul_(g)
    return True
