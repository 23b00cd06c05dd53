// CUDA kernels of the row ops: one thread block per row (grid-stride over rows), the
// per-thread work in row_thread.h, the merge of the threads' states here.
//
// Forward: pass 1 reads the row once (16-byte loads, several in flight per thread). A row
// that fits in the block's registers takes its maxima first and then its sums (no
// rescaling); a longer one keeps an online RowState per thread, which the block merges
// (maxima first, then every thread moves its sums to the row's maxima and the sums add
// up). The row's loss and statistics follow. With a.write_grad
// (the fused path of sum/mean reductions) pass 2 writes the gradient, re-reading the row
// in reverse tile order from L2, except the thread's last tile, which it still holds.
// Backward: reads the row once more and writes the gradient; no merge.
#include <cuda_runtime.h>

#include "row_dispatch.h"
#include "row_kernels.h"

namespace unlearn_ext {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T max_of(T x, T y) {
  return x > y ? x : y;  // the maxima of a state are never NaN (NaN never wins)
}

// The block's maxima of ms and mt: every thread gets them. smem is reused row after
// row: the two barriers of a row (here and in block_sum) separate every write of a slot
// from the reads of the previous row.
template <Op op, typename T>
__device__ __forceinline__ void block_max(T& ms, T& mt, T (&smem)[5][32]) {
  constexpr bool kTeacher = num_teachers(op) >= 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ms = max_of(ms, __shfl_xor_sync(kFullMask, ms, o));
    if (kTeacher) mt = max_of(mt, __shfl_xor_sync(kFullMask, mt, o));
  }
  if (lane == 0) {
    smem[0][warp] = ms;
    smem[1][warp] = mt;
  }
  __syncthreads();
  ms = smem[0][0];
  mt = smem[1][0];
  for (int w = 1; w < nwarps; ++w) {
    ms = max_of(ms, smem[0][w]);
    if (kTeacher) mt = max_of(mt, smem[1][w]);
  }
}

// The block's sums of states that share their maxima. Every thread returns the same
// state, summed in the same order, so that all of them compute identical statistics.
template <Op op, typename T>
__device__ __forceinline__ RowState<T> block_sum(const RowState<T>& st, T (&smem)[5][32]) {
  constexpr bool kTeacher = num_teachers(op) >= 1 || op == Op::kCrossEntropy;  // st, acc in use
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  T sum[3] = {st.ss, st.st, st.acc};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < 3; ++k)
      if (k == 0 || kTeacher) sum[k] += __shfl_xor_sync(kFullMask, sum[k], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) smem[2 + k][warp] = sum[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    sum[k] = smem[2 + k][0];
    for (int w = 1; w < nwarps; ++w) sum[k] += smem[2 + k][w];
  }
  return RowState<T>{st.ms, st.mt, sum[0], sum[1], sum[2]};
}

// Merges the threads' online states: maxima first, then every thread moves its sums to
// them (no exponential per merge step), then the sums add up.
template <Op op, typename T>
__device__ __forceinline__ RowState<T> block_merge(RowState<T> st, T (&smem)[5][32]) {
  T ms = st.ms, mt = st.mt;
  block_max<op, T>(ms, mt, smem);
  if (ms != st.ms || mt != st.mt) rescale<op>(st, ms, mt, FastExp{});
  return block_sum<op, T>(st, smem);
}

template <Op op, typename T, Path P>
__global__ void __launch_bounds__(kMaxThreads) row_forward_kernel(const __grid_constant__ RowArgs a) {
  __shared__ T smem[5][32];
  const Params<T> q = params_of<T>(a);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  T* values = static_cast<T*>(a.values);
  T* stats_out = static_cast<T*>(a.stats);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const RowPlan p = plan_row<op, P>(a, r, a.write_grad);
    if (row_ignored(a, r)) {  // the whole block takes this branch: no barrier is skipped
      if (tid == 0) {
        values[r] = T(0);
        for (int k = 0; k < kNumStats; ++k) stats_out[r * kNumStats + k] = T(0);
      }
      if (a.write_grad) thread_zero_grad<P>(a, p, tid, nthreads);
      continue;
    }
    const T s_label = label_logit<op, T>(a, p, q);
    Tile<op, P> tile;
    RowState<T> st;
    if (fits_registers<op, P>(p, a.vocab, nthreads)) {
      T ms, mt;
      thread_max<op, T, P>(a, p, q, tid, nthreads, tile, ms, mt);
      block_max<op, T>(ms, mt, smem);
      st = block_sum<op, T>(thread_sums<op, T, P>(a, p, q, tid, nthreads, tile, ms, mt), smem);
    } else {
      st = block_merge<op, T>(thread_state<op, T, P>(a, p, q, tid, nthreads, tile), smem);
    }
    T stats[kNumStats];
    T value = finish_row<op, T>(p, st, s_label, q, stats);
    bool tile_cached = true;
    if constexpr (op == Op::kJSD) {  // the second pass: loss and E_p[b], summed over the block
      RowState<T> part{T(0), T(0), T(0), T(0), T(0)};
      thread_jsd<op, T, P>(a, p, q, tid, nthreads, stats, tile, true, part.ss, part.st);
      part = block_sum<op, T>(part, smem);
      value = jsd_finish(part.ss, part.st, stats);
      tile_cached = single_tile<op, P>(p, nthreads);
    }
    if (tid == 0) {
      values[r] = value;
      for (int k = 0; k < kNumStats; ++k) stats_out[r * kNumStats + k] = stats[k];
    }
    if (a.write_grad) {
      const T g = row_grad_factor<op, T>(p, static_cast<T>(fused_grad_scale(a) * a.inv_temperature));
      thread_grad<op, T, P>(a, p, q, tid, nthreads, g, stats, tile, tile_cached);
    }
  }
}

template <Op op, typename T, Path P>
__global__ void __launch_bounds__(kMaxThreads) row_backward_kernel(const __grid_constant__ RowArgs a) {
  const Params<T> q = params_of<T>(a);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const T* stats_in = static_cast<const T*>(a.stats);
  const T* grad_rows = static_cast<const T*>(a.grad_rows);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const RowPlan p = plan_row<op, P>(a, r, true);
    if (row_ignored(a, r)) {
      thread_zero_grad<P>(a, p, tid, nthreads);
      continue;
    }
    T stats[kNumStats];
    for (int k = 0; k < kNumStats; ++k) stats[k] = stats_in[r * kNumStats + k];
    const T g = row_grad_factor<op, T>(p, grad_rows[r] * q.inv_temperature);
    Tile<op, P> tile;
    thread_grad<op, T, P>(a, p, q, tid, nthreads, g, stats, tile, false);
  }
}

template <bool forward>
cudaError_t launch(const RowArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const LaunchConfig c = launch_config(a, !forward || a.write_grad);
  if (c.error != nullptr) return cudaErrorInvalidValue;
  dispatch(a.op, c, [&](auto op, auto t, auto path) {
    using T = decltype(t);
    constexpr Op kOp = decltype(op)::value;
    constexpr Path kPath = decltype(path)::value;
    const dim3 grid(static_cast<unsigned>(c.blocks)), block(static_cast<unsigned>(c.threads));
    if constexpr (forward) {
      row_forward_kernel<kOp, T, kPath><<<grid, block, 0, stream>>>(a);
    } else {
      row_backward_kernel<kOp, T, kPath><<<grid, block, 0, stream>>>(a);
    }
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_forward(const RowArgs& a, cudaStream_t stream) { return launch<true>(a, stream); }
cudaError_t launch_row_backward(const RowArgs& a, cudaStream_t stream) { return launch<false>(a, stream); }

}  // namespace cuda
}  // namespace unlearn_ext
