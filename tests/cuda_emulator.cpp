// Runs the per-thread code of the CUDA row kernels (csrc/cuda/row_thread.h) on the CPU,
// thread after thread, so that their indexing, alignment handling, tiling and per-row
// logic are tested on machines without a GPU. tests/test_cuda_emulated.py builds this
// file with the host compiler and calls it through ctypes.
//
// Emulated faithfully: everything between the barriers of a kernel (each thread's pass 1,
// the merged state, pass 2 with the thread's cached last tile), the launch configuration
// and the choice of kernel variant (the on-chip path's stage included: a host buffer
// stands in for the block's shared memory), exp's float rounding. Not emulated: the block
// merge's shuffles and barriers (row_kernels.cu; here the same three steps run
// sequentially), the memory intrinsics, the launch itself.
#include <cstdint>
#include <vector>

#include "../csrc/cuda/row_dispatch.h"

namespace unlearn_ext {
namespace cuda {
namespace {

// block_merge of row_kernels.cu, sequentially: maxima, every state moved to them, sums.
template <Op op, typename T>
RowState<T> merge_threads(std::vector<RowState<T>>& states) {
  T ms = neg_inf<T>(), mt = neg_inf<T>();
  for (const RowState<T>& s : states) {
    ms = s.ms > ms ? s.ms : ms;
    mt = s.mt > mt ? s.mt : mt;
  }
  RowState<T> out{ms, mt, T(0), T(0), T(0)};
  for (RowState<T>& s : states) {
    if (s.ms != ms || s.mt != mt) rescale<op>(s, ms, mt, FastExp{});
    out.ss += s.ss;
    out.st += s.st;
    out.acc += s.acc;
  }
  return out;
}

// Overwrites the vectorised part of row p's inputs with NaN: poison_inputs's test that the
// passes after pass 1 of an on-chip row read nothing of it from memory.
template <Op op, Path P>
void poison_vectors(const RowArgs& a, const RowPlan& p) {
  const RowView* views[3] = {&a.student, &a.teacher, &a.teacher2};
  for (int k = 0; k < 1 + num_teachers(op); ++k) {
    char* first = vec_ptr<P>(*views[k], p.off[k] + p.vec_begin);
    for (int64_t i = 0; i < p.nvec * 16; i += 2) {  // 0xffff: a NaN in every dtype, in halves
      first[i] = static_cast<char>(0xff);
      first[i + 1] = static_cast<char>(0xff);
    }
  }
}

// row_forward_kernel, one block. poison_inputs: once pass 1 of a row is over, its inputs'
// vectors are overwritten with NaN (tests only).
template <Op op, typename T, Path P, bool kWriteGrad, bool kStaged>
void forward(const RowArgs& a, int nthreads, int64_t stage_vectors, bool poison_inputs) {
  const Params<T> q = params_of<T>(a);
  T* values = static_cast<T*>(a.values);
  T* stats_out = static_cast<T*>(a.stats);
  std::vector<Tile<op, P>> tiles(nthreads);
  std::vector<RowState<T>> states(nthreads);
  std::vector<Raw16> stage_memory(kStaged ? stage_vectors * (1 + num_teachers(op)) : 0);
  const Stage stage{stage_memory.data(), stage_vectors};
  for (int64_t r = 0; r < a.rows; ++r) {
    const RowPlan p = plan_row<op, P>(a, r, kWriteGrad);
    if (row_ignored(a, r)) {
      values[r] = T(0);
      for (int k = 0; k < kNumStats; ++k) stats_out[r * kNumStats + k] = T(0);
      if (kWriteGrad)
        for (int tid = 0; tid < nthreads; ++tid) thread_zero_grad<P>(a, p, tid, nthreads);
      continue;
    }
    const T s_label = label_logit<op, T>(a, p, q);
    if (fits_registers<op, P>(p, a.vocab, nthreads)) {  // maxima first, then sums
      T ms = neg_inf<T>(), mt = neg_inf<T>();
      for (int tid = 0; tid < nthreads; ++tid) {
        T thread_ms, thread_mt;
        thread_max<op, T, P>(a, p, q, tid, nthreads, tiles[tid], thread_ms, thread_mt);
        ms = thread_ms > ms ? thread_ms : ms;
        mt = thread_mt > mt ? thread_mt : mt;
      }
      for (int tid = 0; tid < nthreads; ++tid) states[tid] = thread_sums<op, T, P>(a, p, q, tid, nthreads, tiles[tid], ms, mt);
    } else {
      for (int tid = 0; tid < nthreads; ++tid)
        states[tid] = thread_state<op, T, P, kStaged>(a, p, q, tid, nthreads, tiles[tid], stage);
    }
    if (poison_inputs) poison_vectors<op, P>(a, p);
    const RowState<T> st = merge_threads<op, T>(states);
    T stats[kNumStats];
    T value = finish_row<op, T>(p, st, s_label, q, stats);
    bool tile_cached = true;
    if constexpr (op == Op::kJSD) {  // the second pass, then block_sum of its two sums
      T vsum = T(0), pbsum = T(0);
      for (int tid = 0; tid < nthreads; ++tid) {
        T v, pb;
        thread_jsd<op, T, P, kStaged>(a, p, q, tid, nthreads, stats, tiles[tid], true, stage, v, pb);
        vsum += v;
        pbsum += pb;
      }
      value = jsd_finish(vsum, pbsum, stats);
      tile_cached = single_tile<op, P>(p, nthreads);
    }
    values[r] = value;
    for (int k = 0; k < kNumStats; ++k) stats_out[r * kNumStats + k] = stats[k];
    if (kWriteGrad) {
      const T g = row_grad_factor<op, T>(p, static_cast<T>(a.grad_scale * a.inv_temperature));
      for (int tid = 0; tid < nthreads; ++tid)
        thread_grad<op, T, P, kStaged>(a, p, q, tid, nthreads, g, stats, tiles[tid], tile_cached, stage);
    }
  }
}

// row_backward_kernel, one block.
template <Op op, typename T, Path P>
void backward(const RowArgs& a, int nthreads) {
  const Params<T> q = params_of<T>(a);
  const T* stats_in = static_cast<const T*>(a.stats);
  const T* grad_rows = static_cast<const T*>(a.grad_rows);
  Tile<op, P> tile;
  for (int64_t r = 0; r < a.rows; ++r) {
    const RowPlan p = plan_row<op, P>(a, r, true);
    if (row_ignored(a, r)) {
      for (int tid = 0; tid < nthreads; ++tid) thread_zero_grad<P>(a, p, tid, nthreads);
      continue;
    }
    T stats[kNumStats];
    for (int k = 0; k < kNumStats; ++k) stats[k] = stats_in[r * kNumStats + k];
    const T g = row_grad_factor<op, T>(p, grad_rows[r] * q.inv_temperature);
    for (int tid = 0; tid < nthreads; ++tid)
      thread_grad<op, T, P, false>(a, p, q, tid, nthreads, g, stats, tile, false, Stage{nullptr, 0});
  }
}

}  // namespace
}  // namespace cuda
}  // namespace unlearn_ext

using unlearn_ext::DType;
using unlearn_ext::Op;
using unlearn_ext::RowArgs;
using unlearn_ext::RowView;
namespace uc = unlearn_ext::cuda;

// A C interface for ctypes: RowArgs is filled field group by field group, so that its
// layout stays on this side.
extern "C" {

RowArgs* ue_args_new() { return new RowArgs(); }
void ue_args_free(RowArgs* a) { delete a; }

// params: the kNumParams scalars of the schemas (RowParams.scalars), set by set_params.
void ue_args_set(RowArgs* a, int op, int64_t rows, int64_t vocab, const int64_t* labels, int64_t ignore_index,
                 const double* params) {
  a->op = static_cast<Op>(op);
  a->rows = rows;
  a->vocab = vocab;
  a->labels = labels;
  a->ignore_index = ignore_index;
  unlearn_ext::set_params(*a, params);
}

// which: 0 student, 1 teacher, 2 teacher2, 3 grad.
void ue_args_set_view(RowArgs* a, int which, void* data, int dtype, int64_t inner_rows, int64_t inner_stride,
                      int64_t outer_stride) {
  RowView* views[4] = {&a->student, &a->teacher, &a->teacher2, &a->grad};
  *views[which] = RowView{data, static_cast<DType>(dtype), inner_rows, inner_stride, outer_stride};
}

void ue_args_set_outputs(RowArgs* a, void* values, void* stats, const void* grad_rows, int write_grad,
                         double grad_scale) {
  a->values = values;
  a->stats = stats;
  a->grad_rows = grad_rows;
  a->write_grad = write_grad != 0;
  a->grad_scale = grad_scale;
}

// The on-chip stage a block may take with that much shared memory per multiprocessor and
// per block (row_dispatch.h, stage_limit).
int64_t ue_stage_limit(int64_t per_sm, int64_t per_block) { return uc::stage_limit(per_sm, per_block); }

// The launch configuration the CUDA launcher would choose for a forward (forward=1) or
// backward, a block taking at most stage_limit bytes of stage: returns the block size and
// writes the variant (path, 1 if float64, stage bytes) to out[0..2]; -1 if it refuses.
int ue_launch_config(const RowArgs* a, int uses_grad, int forward, int64_t stage_limit, int64_t* out) {
  const uc::LaunchConfig c = uc::launch_config(*a, uses_grad != 0, forward != 0, stage_limit);
  out[0] = static_cast<int>(c.path);
  out[1] = c.f64 ? 1 : 0;
  out[2] = c.stage_bytes;
  return c.error == nullptr ? c.threads : -1;
}

// The first vectorised element and the vector count of row r, as the launcher's variant
// plans them: out[0] = vec_begin, out[1] = nvec.
void ue_plan(const RowArgs* a, int64_t r, int uses_grad, int64_t* out) {
  const uc::LaunchConfig c = uc::launch_config(*a, uses_grad != 0);
  uc::dispatch(a->op, c, [&](auto op, auto, auto path) {
    const uc::RowPlan p = uc::plan_row<decltype(op)::value, decltype(path)::value>(*a, r, uses_grad != 0);
    out[0] = p.vec_begin;
    out[1] = p.nvec;
  });
}

// Runs the forward (forward=1) or backward with `threads` threads per block (0: the
// launcher's choice) and the launcher's variant for blocks of at most stage_limit bytes
// of stage (threads > 0: the stage is sized for the launcher's block size, which is at
// least as many vectors as a row has). poison_inputs: see forward. Returns 0, or -1 for a
// launch the launcher refuses.
int ue_run(const RowArgs* a, int forward, int threads, int64_t stage_limit, int poison_inputs) {
  const uc::LaunchConfig c = uc::launch_config(*a, !forward || a->write_grad, forward != 0, stage_limit);
  if (c.error != nullptr) return -1;
  const int nthreads = threads > 0 ? threads : c.threads;
  uc::dispatch(a->op, c, [&](auto op, auto t, auto path) {
    using T = decltype(t);
    constexpr Op kOp = decltype(op)::value;
    constexpr uc::Path kPath = decltype(path)::value;
    const bool poison = poison_inputs != 0;
    if (forward && c.stage_bytes > 0 && kPath != uc::Path::kScalar) {  // as row_kernels.cu's launch
      if (a->write_grad) {
        uc::forward<kOp, T, kPath, true, true>(*a, nthreads, c.stage_vectors, poison);
      } else {
        uc::forward<kOp, T, kPath, false, true>(*a, nthreads, c.stage_vectors, poison);
      }
    } else if (forward) {
      if (a->write_grad) {
        uc::forward<kOp, T, kPath, true, false>(*a, nthreads, 0, poison);
      } else {
        uc::forward<kOp, T, kPath, false, false>(*a, nthreads, 0, poison);
      }
    } else {
      uc::backward<kOp, T, kPath>(*a, nthreads);
    }
  });
  return 0;
}

}  // extern "C"
