// Gradient buffers for the CPU kernels that do not cost a page fault per call.
//
// A fresh [N, V] buffer is memory the process has never touched: the first write takes a
// page fault per page and the operating system zeroes every page first (N = 2048,
// V = 32000, fp32: 64,000 faults on 4 KiB pages, about a third of the kernel's own time;
// still ~640 faults and 250 MB zeroed on 2 MiB pages, and which of the two a call gets
// depends on what else the process did). A training step frees its gradient once the
// LM head's backward has used it, so the next step can take the same, already mapped
// memory. These buffers are whole mappings (2 MiB-aligned, transparent huge pages where
// Linux offers them) that go back to a small free list when the last tensor using them is
// freed.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace unlearn_ext {
namespace cpu {

// An uninitialised CPU tensor of `sizes` and `dtype` (contiguous) for a kernel to write a
// gradient into: a free block that fits (at least the size, at most a quarter more) or a
// new mapping. Below kMinPooledBytes, or off Linux, plain at::empty.
at::Tensor grad_buffer(at::IntArrayRef sizes, at::ScalarType dtype);

// The free list: blocks, and their bytes. At most kMaxFreeBlocks, and when a request finds
// none that fits, blocks are unmapped (least recently freed first) until the free bytes do
// not exceed the request's: memory held idle never exceeds one buffer of the current size.
struct GradPoolStats {
  int64_t free_blocks;
  int64_t free_bytes;
};
GradPoolStats grad_pool_stats();
// Unmaps every free block.
void release_grad_pool();

constexpr int64_t kMinPooledBytes = int64_t{4} << 20;
constexpr int64_t kMaxFreeBlocks = 4;

}  // namespace cpu
}  // namespace unlearn_ext
