// CPU row kernels, compiled once per instruction set: row_kernels_<isa>.cpp defines UE_ISA
// (a namespace name), sets the target and includes this file. Everything here has
// internal linkage so that no AVX-512 code can leak into the baseline build at link time.
//
// One thread owns a row. The row is walked in blocks of kBlock elements: each block is
// converted to the compute type in an L1-resident buffer (teacher built on load), its
// maxima and exponential sums are taken by vectorised loops, and the block's state is
// merged into the row's running state (row_math.h). A row is read from memory once in the
// forward; the fused path keeps each element's exp(s - block max) in a per-thread row buffer
// and then walks the row again from L2 to write the gradient, taking p from that buffer by
// one multiply per element instead of an exponential.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/float_bits.h"
#include "../common/row_args.h"
#include "../common/row_math.h"

#ifndef UE_ISA
#error "define UE_ISA before including row_kernels_impl.h"
#endif

namespace unlearn_ext {
namespace cpu {
namespace UE_ISA {
namespace {

constexpr int64_t kBlock = 1024;

// The loops below must be vectorised inside each caller: an out-of-line copy shared by
// several ops (identical-code folding) lost its vectorised exp-sum loop.
#define UE_INLINE inline __attribute__((always_inline))

// exp(x) in float, vectorisable (no calls, no branches): Cephes' expf polynomial on
// x - n ln2 with n = round(x / ln2), about 1 ulp. Below -87.3 the result is 0 (exact for
// masked logits); a NaN stays NaN (the clamps are written so that NaN fails them).
UE_INLINE float exp_fast(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365478515625f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick; its low bits are n.
  const float magic = 12582912.0f;
  const float kf = xc * 1.44269504088896341f + magic;
  const float n = kf - magic;
  const int32_t ni = static_cast<int32_t>(float_to_bits(kf) - float_to_bits(magic));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float y = p * scale;
  return x < lo ? 0.0f : (x > hi ? INFINITY : y);
}
inline double exp_fast(double x) { return std::exp(x); }

struct ExpFn {
  template <typename T>
  T operator()(T x) const { return exp_fast(x); }
};
struct LogFn {
  template <typename T>
  T operator()(T x) const { return std::log(x); }
};
struct Log1pFn {
  template <typename T>
  T operator()(T x) const { return std::log1p(x); }
};
struct Expm1Fn {
  template <typename T>
  T operator()(T x) const { return std::expm1(x); }
};
struct TanhFn {
  template <typename T>
  T operator()(T x) const { return std::tanh(x); }
};
// The per-element functions row_math.h's gradients and JSD terms take.
struct ElemMath {
  template <typename T>
  T exp(T x) const { return exp_fast(x); }
  template <typename T>
  T log(T x) const { return std::log(x); }
  template <typename T>
  T log1p(T x) const { return std::log1p(x); }
  template <typename T>
  T expm1(T x) const { return std::expm1(x); }
};

// dst[i] = scale * src[i] in the compute type T.
template <typename T>
void load(T* dst, const RowView& v, int64_t offset, int64_t n, T scale) {
  switch (v.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(p[i]) * scale;
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        dst[i] = static_cast<T>(bf16_to_float(p[i])) * scale;
      break;
    }
    case DType::kFloat16: {
      const _Float16* p = static_cast<const _Float16*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(p[i])) * scale;
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(p[i] * static_cast<double>(scale));
      break;
    }
  }
}

template <typename T>
T load_one(const RowView& v, int64_t offset) {
  T x;
  load<T>(&x, v, offset, 1, T(1));
  return x;
}

template <typename T>
void store(const RowView& v, int64_t offset, const T* src, int64_t n) {
  switch (v.dtype) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(src[i]);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(static_cast<float>(src[i]));
      break;
    }
    case DType::kFloat16: {
      _Float16* p = static_cast<_Float16*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<_Float16>(static_cast<float>(src[i]));
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(v.data) + offset;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<double>(src[i]);
      break;
    }
  }
}

void zero_row(const RowView& v, int64_t offset, int64_t n) {
  static constexpr int64_t kBytes[] = {4, 2, 2, 8};  // by DType
  std::memset(static_cast<char*>(v.data) + offset * kBytes[static_cast<int>(v.dtype)], 0,
              static_cast<size_t>(n * kBytes[static_cast<int>(v.dtype)]));
}

// Per-thread scratch: the block of student logits, the teacher's (and RKLD's second
// teacher input), the gradient block, and the softcap's derivative.
template <typename T>
struct Scratch {
  alignas(64) T s[kBlock];
  alignas(64) T t[kBlock];
  alignas(64) T t2[kBlock];
  alignas(64) T out[kBlock];
  alignas(64) T dcap[kBlock];
};

// Loads block [b0, b0 + n) of row r's student logits, softcapped (if asked) and scaled by
// 1/temperature, the softcap's derivative in w.dcap.
template <typename T>
void load_student(const RowArgs& a, const RowConsts<T>& c, int64_t r, int64_t b0, int64_t n, Scratch<T>& w) {
  if (c.softcap == T(0)) {
    load<T>(w.s, a.student, row_offset(a.student, r) + b0, n, c.inv_temperature);
  } else {
    load<T>(w.s, a.student, row_offset(a.student, r) + b0, n, T(1));
    for (int64_t i = 0; i < n; ++i) w.s[i] = student_logit(w.s[i], c, w.dcap[i], TanhFn{});
  }
}

// Loads the teacher's block, built from its raw inputs (RKLD, UnDIAL at the label) and then
// scaled by 1/temperature.
template <Op op, typename T>
void load_teacher(const RowArgs& a, const RowConsts<T>& c, int64_t r, int64_t y, int64_t b0, int64_t n,
                  Scratch<T>& w) {
  const T inv_t = c.inv_temperature;
  if constexpr (num_teachers(op) >= 1) {
    load<T>(w.t, a.teacher, row_offset(a.teacher, r) + b0, n, T(1));
    if constexpr (op == Op::kRKLD) {
      load<T>(w.t2, a.teacher2, row_offset(a.teacher2, r) + b0, n, T(1));
      const T alpha = c.alpha;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        w.t[i] = teacher_logit<op, T>(w.t[i], w.t2[i], false, alpha, T(0));
    }
    if constexpr (op == Op::kUnDIAL) {
      if (y >= b0 && y < b0 + n)
        w.t[y - b0] = teacher_logit<op, T>(w.t[y - b0], T(0), true, T(0), c.gamma);
    }
    if (inv_t != T(1)) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) w.t[i] *= inv_t;
    }
  } else {
    (void)a; (void)r; (void)y; (void)b0; (void)n; (void)w; (void)inv_t;
  }
}

template <Op op, typename T>
void load_block(const RowArgs& a, const RowConsts<T>& c, int64_t r, int64_t y, int64_t b0, int64_t n,
                Scratch<T>& w) {
  load_student<T>(a, c, r, b0, n, w);
  load_teacher<op, T>(a, c, r, y, b0, n, w);
}

template <typename T>
UE_INLINE T block_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The state of one loaded block, by two vectorised loops (maxima, then sums). For the token
// ops the label's entry (label_pos, or -1) counts in the maximum but not in the sum. With
// `es` (the fused forward), each exp(s - safe block max) is also stored there (0 at the label).
template <Op op, typename T>
UE_INLINE RowState<T> block_state(Scratch<T>& w, int64_t n, int64_t label_pos, T* es) {
  RowState<T> b = empty_state<T>();
  b.ms = block_max(w.s, n);
  const T ms0 = safe_max(b.ms);
  T ss = 0, st = 0, acc = 0;
  if constexpr (op == Op::kCrossEntropy) {  // label smoothing's sum of every logit; st counts them
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += acc_term<op, T>(w.s[i], T(0), T(0), T(0), ms0, T(0));
    st = static_cast<T>(n);
  }
  if (label_pos >= 0) w.s[label_pos] = neg_inf<T>();
  if constexpr (num_teachers(op) == 0) {
    if (es != nullptr) {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) {
        es[i] = exp_fast(w.s[i] - ms0);
        ss += es[i];
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += exp_fast(w.s[i] - ms0);
    }
  } else if (es != nullptr) {
    b.mt = block_max(w.t, n);
    const T mt0 = safe_max(b.mt);
#pragma omp simd reduction(+ : ss, st, acc)
    for (int64_t i = 0; i < n; ++i) {
      const T e = exp_fast(w.s[i] - ms0);
      const T et = exp_fast(w.t[i] - mt0);
      es[i] = e;
      ss += e;
      st += et;
      acc += acc_term<op, T>(w.s[i], w.t[i], e, et, ms0, mt0);
    }
  } else {
    b.mt = block_max(w.t, n);
    const T mt0 = safe_max(b.mt);
#pragma omp simd reduction(+ : ss, st, acc)
    for (int64_t i = 0; i < n; ++i) {
      const T es = exp_fast(w.s[i] - ms0);
      const T et = exp_fast(w.t[i] - mt0);
      ss += es;
      st += et;
      acc += acc_term<op, T>(w.s[i], w.t[i], es, et, ms0, mt0);
    }
  }
  b.ss = ss;
  b.st = st;
  b.acc = acc;
  return b;
}

// The end of a gradient block, shared by both gradient passes: the label's own element, the
// softcap's derivative, the store.
template <Op op, typename T>
inline void store_grad_block(const RowArgs& a, const RowConsts<T>& cl, int64_t y, T g, const T* stats,
                             int64_t out_offset, int64_t b0, int64_t n, Scratch<T>& w) {
  if constexpr (reads_label_logit(op)) {
    if (y >= b0 && y < b0 + n) w.out[y - b0] = grad_at_label<op, T>(stats, g, cl, ElemMath{});
  }
  if (cl.softcap != T(0)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) w.out[i] *= w.dcap[i];
  }
  store<T>(a.grad, out_offset + b0, w.out, n);
}

// Writes the gradient of row r, g times d(loss)/d(scaled logits) (g includes 1/temperature),
// times the softcap's derivative when there is one.
template <Op op, typename T>
void grad_row(const RowArgs& a, const RowConsts<T>& c, int64_t r, int64_t y, T g, const T* row_stats,
              Scratch<T>& w) {
  // A local copy: the compiler cannot prove that stores to w.out leave row_stats alone, and
  // reloading them inside the loop stops it from vectorising.
  T stats[kNumStats];
  for (int k = 0; k < kNumStats; ++k) stats[k] = row_stats[k];
  const RowConsts<T> cl = c;
  const int64_t out_offset = row_offset(a.grad, r);
  for (int64_t b0 = 0; b0 < a.vocab; b0 += kBlock) {
    const int64_t n = a.vocab - b0 < kBlock ? a.vocab - b0 : kBlock;
    load_block<op, T>(a, cl, r, y, b0, n, w);
    const T* t = num_teachers(op) >= 1 ? w.t : w.s;  // token ops have no teacher
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) w.out[i] = grad_elem<op, T>(w.s[i], t[i], stats, g, cl, ElemMath{});
    store_grad_block<op, T>(a, cl, y, g, stats, out_offset, b0, n, w);
  }
}

// The fused forward's gradient pass: as grad_row, with p = es * exp(block shift - ms - log ss)
// from pass 1's exponentials (es; each block's maximum in shifts, es shifted by its safe_max). Only what the op's gradient
// still needs is loaded again: s and t for the reverse KLs, t for forward KL and UnDIAL,
// nothing for the token ops (s for the softcap's derivative, if there is one).
template <Op op, typename T>
void grad_row_from_exps(const RowArgs& a, const RowConsts<T>& c, int64_t r, int64_t y, T g, const T* row_stats,
                        const T* es, const T* shifts, Scratch<T>& w) {
  T stats[kNumStats];
  for (int k = 0; k < kNumStats; ++k) stats[k] = row_stats[k];
  const RowConsts<T> cl = c;
  constexpr bool kNeedsS = op == Op::kReverseKL || op == Op::kRKLD;
  const bool load_s = kNeedsS || cl.softcap != T(0);
  const int64_t out_offset = row_offset(a.grad, r);
  for (int64_t b0 = 0, k = 0; b0 < a.vocab; b0 += kBlock, ++k) {
    const int64_t n = a.vocab - b0 < kBlock ? a.vocab - b0 : kBlock;
    if (load_s) load_student<T>(a, cl, r, b0, n, w);
    load_teacher<op, T>(a, cl, r, y, b0, n, w);
    const T* e = es + b0;
    const T* s = kNeedsS ? w.s : e;                     // read by the reverse KLs only
    const T* t = num_teachers(op) >= 1 ? w.t : e;       // token ops have no teacher
    // A block that is all -inf has es = 0 (or NaN): its factor must not overflow to inf.
    const T f = shifts[k] == neg_inf<T>() ? T(0) : exp_fast((shifts[k] - stats[0]) - stats[1]);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      w.out[i] = grad_elem_p<op, T>(e[i] * f, s[i], t[i], stats, g, cl, ElemMath{});
    store_grad_block<op, T>(a, cl, y, g, stats, out_offset, b0, n, w);
  }
}

// Per-thread row buffers of the fused forward, kept across calls (the threads are the
// OpenMP pool's): pass 1's exponentials and each block's shift.
template <typename T>
struct RowExps {
  std::vector<T> es, shifts;
  void reserve(int64_t vocab) {
    if (static_cast<int64_t>(es.size()) < vocab) es.resize(static_cast<size_t>(vocab));
    const int64_t blocks = (vocab + kBlock - 1) / kBlock;
    if (static_cast<int64_t>(shifts.size()) < blocks) shifts.resize(static_cast<size_t>(blocks));
  }
};

template <typename T>
RowExps<T>& row_exps(int64_t vocab) {
  static thread_local RowExps<T> buffers;
  buffers.reserve(vocab);
  return buffers;
}

// JSD's second pass over a row: its loss and E_p[b] (row_math.h, jsd_terms), now that
// pass 1 has both log-sums. Blocks in reverse: the last ones read are still in cache.
// The sums run in double: a row's terms have both signs, and one float accumulator over
// V of them would round far more than PyTorch's pairwise sums.
template <Op op, typename T>
T jsd_pass(const RowArgs& a, const RowConsts<T>& c, int64_t r, T* stats, Scratch<T>& w) {
  double value = 0, pb = 0;
  const int64_t last = (a.vocab - 1) / kBlock * kBlock;
  for (int64_t b0 = last; b0 >= 0; b0 -= kBlock) {
    const int64_t n = a.vocab - b0 < kBlock ? a.vocab - b0 : kBlock;
    load_block<op, T>(a, c, r, -1, b0, n, w);
    for (int64_t i = 0; i < n; ++i) {
      T v, q;
      jsd_terms(w.s[i], w.t[i], stats, c, ElemMath{}, v, q);
      value += v;
      pb += q;
    }
  }
  return jsd_finish(static_cast<T>(value), static_cast<T>(pb), stats);
}

template <Op op, typename T>
void forward_rows(const RowArgs& a, int64_t begin, int64_t end) {
  constexpr int ns = kNumStats;
  const RowConsts<T> c = consts_of<T>(a);
  T* values = static_cast<T*>(a.values);
  T* stats_all = static_cast<T*>(a.stats);
  Scratch<T> w;
  // JSD's gradient needs its second pass's statistics: it recomputes p.
  const bool keep_exps = a.write_grad && op != Op::kJSD;
  T* es = nullptr;
  T* shifts = nullptr;
  if (keep_exps) {
    RowExps<T>& buffers = row_exps<T>(a.vocab);
    es = buffers.es.data();
    shifts = buffers.shifts.data();
  }
  for (int64_t r = begin; r < end; ++r) {
    T* stats = stats_all + r * ns;
    if (row_ignored(a, r)) {
      values[r] = T(0);
      for (int k = 0; k < ns; ++k) stats[k] = T(0);
      if (a.write_grad) zero_row(a.grad, row_offset(a.grad, r), a.vocab);
      continue;
    }
    const int64_t y = row_label(a, r);
    RowState<T> state = empty_state<T>();
    for (int64_t b0 = 0, k = 0; b0 < a.vocab; b0 += kBlock, ++k) {
      const int64_t n = a.vocab - b0 < kBlock ? a.vocab - b0 : kBlock;
      load_block<op, T>(a, c, r, y, b0, n, w);
      const int64_t label_pos = reads_label_logit(op) && y >= b0 && y < b0 + n ? y - b0 : -1;
      const RowState<T> b = block_state<op, T>(w, n, label_pos, keep_exps ? es + b0 : nullptr);
      if (keep_exps) shifts[k] = b.ms;  // es were shifted by safe_max of it
      state = merge<op, T>(state, b, ExpFn{});
    }
    T s_label = T(0);
    if constexpr (reads_label_logit(op)) {
      T unused;
      if (y >= 0) s_label = student_logit(load_one<T>(a.student, row_offset(a.student, r) + y), c, unused, TanhFn{});
    }
    T value = finalize<op, T>(state, s_label, stats, c, ExpFn{}, LogFn{}, Log1pFn{});
    if constexpr (op == Op::kJSD) value = jsd_pass<op, T>(a, c, r, stats, w);
    const bool bad_label = needs_label(op) && y < 0;
    if (bad_label) value = NAN;
    values[r] = value;
    if (a.write_grad) {
      const T g = bad_label ? T(NAN) : static_cast<T>(a.grad_scale * a.inv_temperature);
      if (keep_exps) {
        grad_row_from_exps<op, T>(a, c, r, y, g, stats, es, shifts, w);
      } else {
        grad_row<op, T>(a, c, r, y, g, stats, w);
      }
    }
  }
}

template <Op op, typename T>
void backward_rows(const RowArgs& a, int64_t begin, int64_t end) {
  constexpr int ns = kNumStats;
  const RowConsts<T> c = consts_of<T>(a);
  const T* stats_all = static_cast<const T*>(a.stats);
  const T* grad_rows = static_cast<const T*>(a.grad_rows);
  Scratch<T> w;
  for (int64_t r = begin; r < end; ++r) {
    if (row_ignored(a, r)) {
      zero_row(a.grad, row_offset(a.grad, r), a.vocab);
      continue;
    }
    const int64_t y = row_label(a, r);
    const T g = (needs_label(op) && y < 0) ? T(NAN) : grad_rows[r] * c.inv_temperature;
    grad_row<op, T>(a, c, r, y, g, stats_all + r * ns, w);
  }
}

using RowRangeFn = void (*)(const RowArgs&, int64_t, int64_t);

template <typename T>
RowRangeFn pick(Op op, bool forward) {
  switch (op) {
#define UE_CASE(OP) \
  case OP:          \
    return forward ? &forward_rows<OP, T> : &backward_rows<OP, T>;
    UE_CASE(Op::kTokenLogprob)
    UE_CASE(Op::kCrossEntropy)
    UE_CASE(Op::kForwardKL)
    UE_CASE(Op::kReverseKL)
    UE_CASE(Op::kRKLD)
    UE_CASE(Op::kUnDIAL)
    UE_CASE(Op::kJSD)
#undef UE_CASE
  }
  return nullptr;
}

RowRangeFn pick(const RowArgs& a, bool forward) {
  return a.student.dtype == DType::kFloat64 ? pick<double>(a.op, forward) : pick<float>(a.op, forward);
}

}  // namespace

void forward(const RowArgs& a, int64_t begin, int64_t end) { pick(a, true)(a, begin, end); }
void backward(const RowArgs& a, int64_t begin, int64_t end) { pick(a, false)(a, begin, end); }

}  // namespace UE_ISA
}  // namespace cpu
}  // namespace unlearn_ext
