"""grad *= g with g read from device memory: the backward of a gradient written during the
forward (unlearn_ext/ops/_grad_scale.py). When g == 1 every load and store is masked off,
so the launch moves no data and nothing is decided on the host."""
import triton
import triton.language as tl

SCALE_BLOCK = 4096


@triton.jit
def scale_kernel(X, n, G, BLOCK: tl.constexpr):
    g = tl.load(G)
    limit = tl.where(g == 1.0, 0, n)  # g == 1: no element is loaded or stored
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < limit
    x = tl.load(X + offs, mask=mask)
    tl.store(X + offs, (x.to(tl.float32) * g).to(X.dtype.element_ty), mask=mask)
