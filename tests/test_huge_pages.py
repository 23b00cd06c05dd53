"""Fresh CPU gradient buffers are backed by transparent huge pages where the kernel offers
them, and the hint changes nothing else."""
from __future__ import annotations

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext import reference
from unlearn_ext.ops._huge_pages import HUGE_PAGE, advise_huge_pages
from unlearn_ext.ops._row_loss import new_grad_buffer


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def _advised_bytes_over(t: torch.Tensor) -> int:
    """Bytes of t's storage in mappings that carry the huge-page advice (VmFlags "hg" in
    /proc/self/smaps). Whether the kernel then finds free 2 MiB pages at the first touch
    depends on the machine's memory fragmentation (CI's, after thousands of tests, often
    had none: AnonHugePages 0), so the test checks what this package controls: the advice."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    total, overlap = 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlap = max(0, min(hi, end) - max(lo, start))
            elif head == "VmFlags:" and "hg" in line.split()[1:]:
                total += overlap
    return total


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"),
                    reason=f"transparent huge pages are {_thp_mode()} on this machine")
def test_a_new_gradient_buffer_is_advised_to_use_huge_pages(monkeypatch):
    monkeypatch.delenv("UNLEARN_EXT_POISON", raising=False)
    like = torch.empty(64, (16 * HUGE_PAGE) // (64 * 4))
    grad = new_grad_buffer(like)
    # All but the unaligned head and tail of the 32 MiB buffer.
    assert _advised_bytes_over(grad) >= 14 * HUGE_PAGE
    assert _advised_bytes_over(torch.empty_like(grad)) == 0  # a plain tensor is not advised


def test_the_hint_keeps_contents_and_ignores_what_it_cannot_use():
    t = torch.randn(3 * HUGE_PAGE // 4 + 5)
    before = t.clone()
    assert advise_huge_pages(t) is t and torch.equal(t, before)
    small, meta = torch.ones(7), torch.empty(1 << 22, device="meta")
    assert advise_huge_pages(small) is small and advise_huge_pages(meta) is meta


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ops_on_fresh_huge_page_buffers_match_the_reference(monkeypatch, reduction, seed):
    """Without the tests' NaN poisoning the gradient buffer is a fresh torch.empty: the
    path users run. 4 MiB and more, so the hint applies."""
    monkeypatch.delenv("UNLEARN_EXT_POISON", raising=False)
    x = (torch.randn(256, 8192) * 4).requires_grad_(True)
    y = torch.randint(0, 8192, (256,))
    w = torch.rand(256)
    out = ue.cross_entropy(x, y, reduction=reduction, backend="cpu")
    (out * w).sum().backward() if reduction == "none" else out.backward()
    x64 = x.detach().double().requires_grad_(True)
    ref = reference.cross_entropy(x64, y)
    (ref * w.double()).sum().backward() if reduction == "none" else ref.mean().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
