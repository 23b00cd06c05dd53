// Host-side choices of a CUDA row-op launch (kernel variant, block size) and the dispatch
// from run-time op and variant to template arguments. Shared by the launchers
// (row_kernels.cu) and the CPU emulator of the kernels (tests/cuda_emulator.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "row_thread.h"

namespace unlearn_ext {
namespace cuda {

// Threads per block never exceed this (the kernels' launch bound: at most 64 registers
// per thread, so that two 512-thread blocks can share a multiprocessor).
constexpr int kMaxThreads = 1024;

struct LaunchConfig {
  const char* error;  // why the arguments cannot be launched, or null
  bool f64;           // compute in double (float64 logits); else float
  Path path;
  int threads;
  int64_t blocks;
};

inline int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n && p < kMaxThreads) p *= 2;
  return p;
}

// uses_grad: the launch writes a gradient (the fused forward, the backward).
inline LaunchConfig launch_config(const RowArgs& a, bool uses_grad) {
  LaunchConfig c{nullptr, a.student.dtype == DType::kFloat64, Path::kScalar, 32, 0};
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
  // vec_elems * unroll elements per tile), at most 512 for rows of up to 160 KiB (all
  // inputs), else 1024. Two 512-thread blocks share a multiprocessor, so that one streams
  // while the other merges its threads' states; a long row gets a whole multiprocessor so
  // that the rows that pass 2 re-reads (one per block in flight) still fit in L2
  // (40-50 MB over 108-132 multiprocessors on A100/H100: ~150 KB per block at two blocks).
  int64_t row_bytes = a.vocab * dtype_bytes(a.student.dtype);
  for (int k = 0; k < 2; ++k) row_bytes += used[k] ? a.vocab * dtype_bytes(views[k]->dtype) : 0;
  const int64_t per_thread = c.path == Path::kScalar ? 1 : int64_t{vec_elems(c.path)} * unroll(a.op);
  const int cap = row_bytes <= 160 * 1024 ? 512 : kMaxThreads;
  const int t = pow2_at_least((a.vocab + per_thread - 1) / per_thread);
  c.threads = t < 32 ? 32 : t > cap ? cap : t;
  c.blocks = a.rows < int64_t{0x7fffffff} ? a.rows : int64_t{0x7fffffff};
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
