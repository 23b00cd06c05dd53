// CUDA kernels of the row ops: one thread block per row (grid-stride over rows), the
// per-thread work in row_thread.h, the merge of the threads' states here.
//
// Forward: pass 1 reads the row once (16-byte loads, several in flight per thread). A row
// that fits in the block's registers takes its maxima first and then its sums (no
// rescaling); a longer one keeps an online RowState per thread, which the block merges
// (maxima first, then every thread moves its sums to the row's maxima and the sums add
// up). The row's loss and statistics follow. With kWriteGrad (the fused path of sum/mean
// reductions) pass 2 writes the gradient, re-reading the row in reverse tile order,
// except the thread's last tile, which it still holds: from shared memory where pass 1
// staged the row there (kStaged, the on-chip path: row_dispatch.h says which rows), else
// from L2. Backward: reads the row once more and writes the gradient; no merge.
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

template <Op op, typename T, Path P, bool kWriteGrad, bool kStaged>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    row_forward_kernel(const __grid_constant__ RowArgs a, int64_t stage_vectors) {
  __shared__ T smem[5][32];
  extern __shared__ Raw16 stage_memory[];  // kStaged: stage_vectors per input
  const Stage stage{stage_memory, stage_vectors};
  const Params<T> q = params_of<T>(a);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  T* values = static_cast<T*>(a.values);
  T* stats_out = static_cast<T*>(a.stats);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const RowPlan p = plan_row<op, P>(a, r, kWriteGrad);
    if (row_ignored(a, r)) {  // the whole block takes this branch: no barrier is skipped
      if (tid == 0) {
        values[r] = T(0);
        for (int k = 0; k < kNumStats; ++k) stats_out[r * kNumStats + k] = T(0);
      }
      if constexpr (kWriteGrad) thread_zero_grad<P>(a, p, tid, nthreads);
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
      st = block_merge<op, T>(thread_state<op, T, P, kStaged>(a, p, q, tid, nthreads, tile, stage), smem);
    }
    T stats[kNumStats];
    T value = finish_row<op, T>(p, st, s_label, q, stats);
    bool tile_cached = true;
    if constexpr (op == Op::kJSD) {  // the second pass: loss and E_p[b], summed over the block
      RowState<T> part{T(0), T(0), T(0), T(0), T(0)};
      thread_jsd<op, T, P, kStaged>(a, p, q, tid, nthreads, stats, tile, true, stage, part.ss, part.st);
      part = block_sum<op, T>(part, smem);
      value = jsd_finish(part.ss, part.st, stats);
      tile_cached = single_tile<op, P>(p, nthreads);
    }
    if (tid == 0) {
      values[r] = value;
      for (int k = 0; k < kNumStats; ++k) stats_out[r * kNumStats + k] = stats[k];
    }
    if constexpr (kWriteGrad) {
      const T g = row_grad_factor<op, T>(p, static_cast<T>(fused_grad_scale(a) * a.inv_temperature));
      thread_grad<op, T, P, kStaged>(a, p, q, tid, nthreads, g, stats, tile, tile_cached, stage);
    }
  }
}

template <Op op, typename T, Path P>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM) row_backward_kernel(const __grid_constant__ RowArgs a) {
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
    thread_grad<op, T, P, false>(a, p, q, tid, nthreads, g, stats, tile, false, Stage{nullptr, 0});
  }
}

// The stage a block of the current device may take (row_dispatch.h, stage_limit).
cudaError_t device_stage_limit(int64_t& bytes) {
  int device = 0, per_sm = 0, per_block = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  bytes = e == cudaSuccess ? stage_limit(per_sm, per_block) : 0;
  return e;
}

template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, const LaunchConfig& c, int64_t shared_bytes, cudaStream_t stream,
                          const Args&... args) {
  // Above 48 KB a kernel's dynamic shared memory must be allowed first (a host-side
  // attribute, no stream operation: legal during graph capture).
  if (shared_bytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(c.blocks)), dim3(static_cast<unsigned>(c.threads)), shared_bytes, stream>>>(
      args...);
  return cudaGetLastError();
}

template <bool forward>
cudaError_t launch(const RowArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  int64_t limit = 0;
  if (forward) {
    const cudaError_t e = device_stage_limit(limit);
    if (e != cudaSuccess) return e;
  }
  const LaunchConfig c = launch_config(a, !forward || a.write_grad, forward, limit);
  if (c.error != nullptr) return cudaErrorInvalidValue;
  cudaError_t result = cudaSuccess;
  dispatch(a.op, c, [&](auto op, auto t, auto path) {
    using T = decltype(t);
    constexpr Op kOp = decltype(op)::value;
    constexpr Path kPath = decltype(path)::value;
    if constexpr (!forward) {
      result = launch_kernel(row_backward_kernel<kOp, T, kPath>, c, 0, stream, a);
    } else if constexpr (kPath == Path::kScalar) {  // no vectors: never staged
      result = a.write_grad ? launch_kernel(row_forward_kernel<kOp, T, kPath, true, false>, c, 0, stream, a, int64_t{0})
                            : launch_kernel(row_forward_kernel<kOp, T, kPath, false, false>, c, 0, stream, a, int64_t{0});
    } else if (c.stage_bytes > 0) {
      if (a.write_grad) {
        result = launch_kernel(row_forward_kernel<kOp, T, kPath, true, true>, c, c.stage_bytes, stream, a,
                               c.stage_vectors);
      } else if constexpr (kOp == Op::kJSD) {  // JSD's second sum: the only forward without
        result = launch_kernel(row_forward_kernel<kOp, T, kPath, false, true>, c, c.stage_bytes, stream, a,
                               c.stage_vectors);  // a gradient that re-reads the row
      }
    } else {
      result = a.write_grad ? launch_kernel(row_forward_kernel<kOp, T, kPath, true, false>, c, 0, stream, a, int64_t{0})
                            : launch_kernel(row_forward_kernel<kOp, T, kPath, false, false>, c, 0, stream, a, int64_t{0});
    }
  });
  return result;
}

}  // namespace

cudaError_t launch_row_forward(const RowArgs& a, cudaStream_t stream) { return launch<true>(a, stream); }
cudaError_t launch_row_backward(const RowArgs& a, cudaStream_t stream) { return launch<false>(a, stream); }

}  // namespace cuda
}  // namespace unlearn_ext
