"""Shared fixtures: which backends run here, poisoned outputs, fresh random seeds."""
from __future__ import annotations

import os
import random

import pytest
import torch

import unlearn_ext as ue

# Totals of fuzz cases, bad inputs and faults tried, printed after the run.
pytest_plugins = ["reliability_tally"]


def _backend_devices():
    """(backend, device) pairs this machine can run, every available backend included."""
    status = ue.backends()
    pairs = [("torch", "cpu")]
    if status["cpu"].available:
        pairs.append(("cpu", "cpu"))
    if status["triton"].available and not torch.cuda.is_available():
        pairs.append(("triton", "cpu"))  # the Triton interpreter (TRITON_INTERPRET=1)
    if torch.cuda.is_available():
        pairs.append(("torch", "cuda"))
        for name in ("cuda", "triton"):
            if status[name].available:
                pairs.append((name, "cuda"))
    return pairs


BACKEND_DEVICES = _backend_devices()
KERNEL_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p[0] != "torch"]


def backend_params(pairs=None):
    return [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in (pairs or BACKEND_DEVICES)]


@pytest.fixture(autouse=True)
def _poison_outputs(request, monkeypatch):
    """Every output buffer a kernel path allocates starts as NaN: an element a kernel
    forgets to write fails the comparison instead of passing on leftover memory. Tests
    marked ``as_users_run`` (compile, autocast, LoRA, the CLI) run without it: they must
    fail where the product fails, in the configuration users run."""
    if request.node.get_closest_marker("as_users_run"):
        monkeypatch.delenv("UNLEARN_EXT_POISON", raising=False)
    else:
        monkeypatch.setenv("UNLEARN_EXT_POISON", "1")


@pytest.fixture
def seed():
    """A fresh seed per test, printed (shown on failure) so that a failing draw can be
    replayed with UNLEARN_EXT_TEST_SEED=<seed>."""
    value = int(os.environ.get("UNLEARN_EXT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    print(f"UNLEARN_EXT_TEST_SEED={value}")
    return value
