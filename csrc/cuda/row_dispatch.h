// Host-side choices of a CUDA row-op launch (kernel variant, block size) and the dispatch
// from run-time op and variant to template arguments. Shared by the launchers
// (row_kernels.cu) and the CPU emulator of the kernels (tests/cuda_emulator.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "row_thread.h"

namespace unlearn_ext {
namespace cuda {

// Threads per block never exceed this, and the kernels' launch bound asks for two such
// blocks per multiprocessor (so at most 64 registers per thread): two rows stream on
// every multiprocessor at any vocabulary size, one merging or writing its gradient while
// the other reads.
constexpr int kMaxThreads = 512;
constexpr int kMinBlocksPerSM = 2;
// What a block's shared memory holds besides the stage (row_kernels.cu's merge buffer),
// and what the hardware reserves per block (1 KB on sm_80 and sm_90).
constexpr int64_t kStaticSharedBytes = 5 * 32 * 8;
constexpr int64_t kReservedSharedBytes = 1024;

// The stage (row_thread.h) one block may take so that kMinBlocksPerSM blocks still share a
// multiprocessor with `shared_per_sm` bytes of shared memory (sm_90: 228 KB, so 112 KB per
// block; sm_80: 164 KB, 80 KB) and at most `shared_per_block` (the opt-in limit).
inline int64_t stage_limit(int64_t shared_per_sm, int64_t shared_per_block) {
  const int64_t share = shared_per_sm / kMinBlocksPerSM - kReservedSharedBytes - kStaticSharedBytes;
  const int64_t cap = shared_per_block - kStaticSharedBytes;
  return share < cap ? share : cap;
}

struct LaunchConfig {
  const char* error;  // why the arguments cannot be launched, or null
  bool f64;           // compute in double (float64 logits); else float
  Path path;
  int threads;
  int64_t blocks;
  int64_t stage_vectors;  // on-chip path: 16-byte vectors of the stage per input (0: none)
  int64_t stage_bytes;    // the dynamic shared memory that takes
};

inline int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n && p < kMaxThreads) p *= 2;
  return p;
}

// uses_grad: the launch writes a gradient (the fused forward, the backward); forward: it
// is a forward. stage_limit_bytes: the dynamic shared memory a block may take (stage_limit;
// 0: no on-chip path).
inline LaunchConfig launch_config(const RowArgs& a, bool uses_grad, bool forward = true,
                                  int64_t stage_limit_bytes = 0) {
  LaunchConfig c{nullptr, a.student.dtype == DType::kFloat64, Path::kScalar, 32, 0, 0, 0};
  const RowView* views[3] = {&a.teacher, &a.teacher2, &a.grad};
  const bool used[3] = {num_teachers(a.op) >= 1, num_teachers(a.op) >= 2, uses_grad};
  bool same_dtype = true;
  for (int k = 0; k < 3; ++k) {
    if (!used[k]) continue;
    if (views[k]->inner_rows != a.student.inner_rows) c.error = "unlearn_ext: the tensors of a row op must have the same shape";
    same_dtype = same_dtype && views[k]->dtype == a.student.dtype;
  }
  if (uses_grad && a.grad.dtype != a.student.dtype) c.error = "unlearn_ext: grad must have the dtype of logits";
  if (same_dtype && !c.f64) {
    c.path = a.student.dtype == DType::kFloat32 ? Path::kFloat32
             : a.student.dtype == DType::kBFloat16 ? Path::kBFloat16 : Path::kFloat16;
  }
  // Block size: enough threads to cover the row in one tile (a thread reads
  // vec_elems * unroll elements per tile), at most kMaxThreads.
  const int64_t per_thread = c.path == Path::kScalar ? 1 : int64_t{vec_elems(c.path)} * unroll(a.op);
  const int t = pow2_at_least((a.vocab + per_thread - 1) / per_thread);
  c.threads = t < 32 ? 32 : t;
  c.blocks = a.rows < int64_t{0x7fffffff} ? a.rows : int64_t{0x7fffffff};
  // The on-chip path: a forward with a pass after pass 1 (the gradient, JSD's second sum)
  // keeps the row in shared memory when every input's vectors fit in the block's share
  // (rows that fit in one tile of registers leave the stage unused; its size never costs
  // occupancy: the limit leaves room for two blocks of kMaxThreads). Longer rows re-read
  // their tiles from L2, in reverse order (two rows per multiprocessor in flight: 264 x
  // 256 KB = 67 MB at V = 128k in bf16, about half of it still to be re-read at any
  // time, against a 50 MB L2).
  const bool second_pass = forward && (uses_grad || a.op == Op::kJSD);
  if (second_pass && c.path != Path::kScalar) {
    const int64_t vectors = a.vocab / vec_elems(c.path);  // at least any row's nvec
    const int64_t bytes = vectors * 16 * (1 + num_teachers(a.op));
    if (bytes <= stage_limit_bytes) {
      c.stage_vectors = vectors;
      c.stage_bytes = bytes;
    }
  }
  return c;
}

template <Op op>
using OpTag = std::integral_constant<Op, op>;
template <Path p>
using PathTag = std::integral_constant<Path, p>;

// Calls f(OpTag<op>, T(), PathTag<path>) for the launch's op and variant.
template <Op op, typename F>
void dispatch_variant(const LaunchConfig& c, F&& f) {
  if (c.f64) return f(OpTag<op>{}, double{}, PathTag<Path::kScalar>{});
  switch (c.path) {
    case Path::kFloat32: return f(OpTag<op>{}, float{}, PathTag<Path::kFloat32>{});
    case Path::kBFloat16: return f(OpTag<op>{}, float{}, PathTag<Path::kBFloat16>{});
    case Path::kFloat16: return f(OpTag<op>{}, float{}, PathTag<Path::kFloat16>{});
    case Path::kScalar: return f(OpTag<op>{}, float{}, PathTag<Path::kScalar>{});
  }
}

template <typename F>
void dispatch(Op op, const LaunchConfig& c, F&& f) {
  switch (op) {
    case Op::kTokenLogprob: return dispatch_variant<Op::kTokenLogprob>(c, f);
    case Op::kCrossEntropy: return dispatch_variant<Op::kCrossEntropy>(c, f);
    case Op::kForwardKL: return dispatch_variant<Op::kForwardKL>(c, f);
    case Op::kReverseKL: return dispatch_variant<Op::kReverseKL>(c, f);
    case Op::kRKLD: return dispatch_variant<Op::kRKLD>(c, f);
    case Op::kUnDIAL: return dispatch_variant<Op::kUnDIAL>(c, f);
    case Op::kJSD: return dispatch_variant<Op::kJSD>(c, f);
  }
}

}  // namespace cuda
}  // namespace unlearn_ext
