// The CPU gradient buffers' free list (grad_pool.h).
#include "grad_pool.h"

#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace unlearn_ext {
namespace cpu {
namespace {

#if defined(__linux__)
constexpr size_t kHugePage = size_t{2} << 20;

struct Block {
  void* ptr;
  size_t bytes;  // a multiple of kHugePage
};

// Never destroyed: a tensor freed during interpreter teardown still gives its block back.
std::mutex& pool_mutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}
// Least recently freed first.
std::vector<Block>& free_list() {
  static std::vector<Block>* blocks = new std::vector<Block>;
  return *blocks;
}

void unmap(const std::vector<Block>& blocks) {
  for (const Block& b : blocks) munmap(b.ptr, b.bytes);
}

// A new mapping of `bytes` at a 2 MiB boundary (so every page of it can be a huge page):
// map one huge page more, then unmap the unaligned head and tail.
void* map_block(size_t bytes) {
  void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = aligned + bytes, end = start + bytes + kHugePage;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
  void* p = reinterpret_cast<void*>(aligned);
  madvise(p, bytes, MADV_HUGEPAGE);  // a refusal (THP off) leaves ordinary pages
  return p;
}

// A free block of `need` bytes or up to a quarter more, else nullptr after trimming the
// free list to `need` bytes.
Block take(size_t need) {
  std::vector<Block> evicted;
  Block got{nullptr, 0};
  {
    std::lock_guard<std::mutex> lock(pool_mutex());
    std::vector<Block>& blocks = free_list();
    for (size_t i = blocks.size(); i-- > 0;) {
      if (blocks[i].bytes >= need && blocks[i].bytes <= need + need / 4) {
        got = blocks[i];
        blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
    }
    if (got.ptr == nullptr) {
      size_t held = 0;
      for (const Block& b : blocks) held += b.bytes;
      while (!blocks.empty() && held > need) {
        held -= blocks.front().bytes;
        evicted.push_back(blocks.front());
        blocks.erase(blocks.begin());
      }
    }
  }
  unmap(evicted);
  return got;
}

void give_back(Block b) {
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(pool_mutex());
    std::vector<Block>& blocks = free_list();
    blocks.push_back(b);
    while (static_cast<int64_t>(blocks.size()) > kMaxFreeBlocks) {
      evicted.push_back(blocks.front());
      blocks.erase(blocks.begin());
    }
  }
  unmap(evicted);
}
#endif

}  // namespace

at::Tensor grad_buffer(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (nbytes >= kMinPooledBytes) {
    const size_t need = (static_cast<size_t>(nbytes) + kHugePage - 1) / kHugePage * kHugePage;
    Block b = take(need);
    if (b.ptr == nullptr) b = Block{map_block(need), need};
    if (b.ptr != nullptr) return at::from_blob(b.ptr, sizes, [b](void*) { give_back(b); }, options);
  }
#endif
  return at::empty(sizes, options);
}

GradPoolStats grad_pool_stats() {
  GradPoolStats s{0, 0};
#if defined(__linux__)
  std::lock_guard<std::mutex> lock(pool_mutex());
  for (const Block& b : free_list()) {
    s.free_blocks += 1;
    s.free_bytes += static_cast<int64_t>(b.bytes);
  }
#endif
  return s;
}

void release_grad_pool() {
#if defined(__linux__)
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(pool_mutex());
    evicted.swap(free_list());
  }
  unmap(evicted);
#endif
}

}  // namespace cpu
}  // namespace unlearn_ext
