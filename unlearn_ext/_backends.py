"""The backends of the row ops, what each needs, and which one a call uses.

``torch``  the plain-PyTorch reference (reference.py), always available
``cpu``    the C++ extension (unlearn_ext._C), CPU tensors
``cuda``   the CUDA extension (unlearn_ext._C_cuda), CUDA tensors
``triton`` Triton kernels (unlearn_ext.triton_kernels), CUDA tensors, or CPU tensors
           under TRITON_INTERPRET=1

A call uses its ``backend=`` argument, else ``UNLEARN_EXT_BACKEND``, else the fastest one
available for the tensors' device. A backend that is named but cannot run raises with
the reason.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

NAMES = ("torch", "cpu", "cuda", "triton")
_MODULES = {"cpu": "unlearn_ext._C", "cuda": "unlearn_ext._C_cuda", "triton": "unlearn_ext.triton_kernels"}


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    detail: str  # what it runs on, or why it is unavailable

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.detail}"


class TorchOpKernels:
    """Row kernels registered as torch ops (CPU and CUDA extensions share the schemas)."""

    def __init__(self, name: str, fuses_grad: bool):
        self.name = name
        # Can write the gradient during the forward (sum/mean reductions): on the CPU the
        # second walk over a row hits L2, cheaper than a backward pass from memory.
        self.fuses_grad = fuses_grad

    def forward(self, op, logits, teacher, teacher2, labels, p):
        return torch.ops.unlearn_ext.row_loss_forward(op, logits, teacher, teacher2, labels, p.ignore_index,
                                                      p.scalars())

    def forward_with_grad(self, op, logits, teacher, teacher2, labels, p, grad, grad_scale):
        """grad_scale: a one-element tensor on the logits' device (read there by GPU kernels)."""
        return torch.ops.unlearn_ext.row_loss_forward_with_grad(
            op, logits, teacher, teacher2, labels, p.ignore_index, p.scalars(), grad, grad_scale)

    def scale_grad(self, grad, g):
        """grad *= g, a no-op when g == 1, decided on the device."""
        torch.ops.unlearn_ext.scale_grad(grad, g)

    def backward(self, op, logits, teacher, teacher2, labels, stats, grad_rows, p, grad):
        torch.ops.unlearn_ext.row_loss_backward(
            op, logits, teacher, teacher2, labels, stats, grad_rows, p.ignore_index, p.scalars(), grad)


def _try_import(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # a missing or broken build: report it, keep the package usable
        return None, f"{type(exc).__name__}: {exc}"


def _load_extensions() -> dict[str, tuple]:
    """Imports every backend that can load here, once, when the package is imported: the
    dispatch below is then plain dictionary lookups, which torch.compile traces."""
    loaded = {"cpu": _try_import(_MODULES["cpu"])}
    if loaded["cpu"][0] is not None:  # the C++ extension defines the op schemas
        from ._fake_ops import register_fakes

        register_fakes()
    if torch.version.cuda is None:
        loaded["cuda"] = (None, "this torch build has no CUDA")
    elif loaded["cpu"][0] is None:
        loaded["cuda"] = (None, "the CUDA extension needs the C++ extension, which did not load")
    else:
        loaded["cuda"] = _try_import(_MODULES["cuda"])
    if torch.cuda.is_available() or _interpreting():
        loaded["triton"] = _try_import(_MODULES["triton"])
    else:
        loaded["triton"] = (None, "Triton needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)")
    return loaded


def _import(name: str):
    """(module, None) or (None, why it did not load)."""
    return _LOADED[name]


def _cpu_status() -> BackendStatus:
    ext, err = _import("cpu")
    if ext is None:
        return BackendStatus(False, f"C++ extension not built ({err})")
    return BackendStatus(True, f"C++ kernels, {ext.cpu_isa()}")


def _cuda_status() -> BackendStatus:
    ext, err = _import("cuda")
    if ext is None:
        return BackendStatus(False, f"CUDA extension not built ({err})")
    if not torch.cuda.is_available():
        return BackendStatus(False, "CUDA extension built, but no CUDA device is visible")
    return BackendStatus(True, f"CUDA kernels, {torch.cuda.get_device_name()}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    mod, err = _import("triton")
    if mod is None:
        return BackendStatus(False, f"Triton kernels unavailable ({err})")
    if torch.cuda.is_available():
        return BackendStatus(True, f"Triton kernels, {torch.cuda.get_device_name()}")
    if _interpreting():
        return BackendStatus(True, "Triton kernels in the interpreter (TRITON_INTERPRET=1), CPU tensors")
    return BackendStatus(False, "Triton needs a CUDA device (or TRITON_INTERPRET=1 to run on the CPU)")


def backends() -> dict[str, BackendStatus]:
    """Every backend, available or not, with what it runs on or why it cannot."""
    return {
        "torch": BackendStatus(True, "plain PyTorch reference"),
        "cpu": _cpu_status(),
        "cuda": _cuda_status(),
        "triton": _triton_status(),
    }


_LOADED = _load_extensions()
# Every kernel backend writes the gradient during the forward (sum/mean), on every device:
# the mean's divisor and the upstream gradient are read on the device (no host sync).
_KERNELS = {"cpu": TorchOpKernels("cpu", fuses_grad=True), "cuda": TorchOpKernels("cuda", fuses_grad=True)}
if _LOADED["triton"][0] is not None:
    _KERNELS["triton"] = _LOADED["triton"][0].KERNELS


def _kernels(name: str):
    return _KERNELS[name]


def _runs_on(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot take tensors on `device`, or None if it can."""
    if device.type == "meta":  # shapes only: the fake kernels (_fake_ops.py) stand in for any backend
        return None
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device}"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
    return None


def resolve(backend: str | None, device: torch.device):
    """The kernels for a call: None for the torch reference, else an object with
    forward / forward_with_grad / backward (see TorchOpKernels)."""
    source = "backend" if backend else "UNLEARN_EXT_BACKEND"
    name = backend or os.environ.get("UNLEARN_EXT_BACKEND") or None
    if name is None:
        order = ("cpu",) if device.type == "cpu" else ("cuda", "triton") if device.type == "cuda" else ()
        name = next((n for n in order if _LOADED[n][0] is not None), "torch")
    if name not in NAMES:
        raise ValueError(f"{source} must be one of {', '.join(NAMES)}, got {name!r}")
    if name == "torch":
        return None
    if _LOADED[name][0] is None or (name == "cuda" and not torch.cuda.is_available()):
        raise RuntimeError(f"backend {name!r} is not available: {backends()[name].detail}")
    why = _runs_on(name, device)
    if why is not None:
        raise ValueError(why)
    return _kernels(name)
