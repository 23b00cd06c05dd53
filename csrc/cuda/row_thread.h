// The work of one thread of the CUDA row kernels, as plain host+device functions.
//
// A thread block owns a row. Each thread walks its share of the row (pass 1: online
// maxima and sums, row_math.h's RowState), the block merges the threads' states
// (row_kernels.cu), and the thread then walks its share again to write the gradient
// (pass 2), in reverse tile order so that the tiles read last in pass 1 are re-read from
// L2 first; the thread's last tile is still in its registers and is not re-read at all.
// A row that fits in the block's share of shared memory (the on-chip path) is copied
// there by pass 1 and pass 2 reads it from there: nothing of it is re-read from memory.
//
// Everything here compiles with nvcc for the device and with a plain C++ compiler for
// the host, where tests/cuda_emulator.cpp runs the same code thread by thread to test
// the kernels' indexing, alignment and per-row logic on machines without a GPU.
//
// Layout of a row's work: elements [vec_begin, vec_begin + nvec * kVecN) are read as
// 16-byte vectors, in tiles of nthreads * kUnroll vectors (thread tid takes vectors
// tile_start + u * nthreads + tid, u < kUnroll: coalesced, kUnroll loads in flight); the
// elements before and after (a row start that is not 16-byte aligned, a vocabulary that
// is not a multiple of the vector) go one by one. A row is vectorised when the student's
// first aligned element is also aligned in every other tensor the pass touches.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define UE_HDM __host__ __device__ __forceinline__
#else
#define UE_HDM inline
#endif
#if defined(__CUDA_ARCH__)
#define UE_UNROLL _Pragma("unroll")
#else
#define UE_UNROLL
#endif

#include "../common/float_bits.h"
#include "../common/row_args.h"
#include "../common/row_math.h"

namespace unlearn_ext {
namespace cuda {

// Kernel variants by how a row is read: 16-byte vectors of one storage type shared by
// every tensor of the launch, or element by element (float64, mixed dtypes).
enum class Path : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kScalar = 3 };

UE_HD constexpr int dtype_bytes(DType d) {
  return d == DType::kFloat32 ? 4 : d == DType::kFloat64 ? 8 : 2;
}
UE_HD constexpr int path_bytes(Path p) { return p == Path::kFloat32 ? 4 : 2; }
// Elements per 16-byte vector (1: the scalar path has no vectors).
UE_HD constexpr int vec_elems(Path p) { return p == Path::kScalar ? 1 : 16 / path_bytes(p); }
// 16-byte loads each thread keeps in flight per input tensor: 4, 2 and 1 x 16 bytes for
// one, two and three inputs (RKLD: at 2 its pass-1 loop needs more than the launch
// bound's 64 registers and ptxas spills inside it, 8 local accesses per iteration in
// sm_90 SASS; at 1 it has none, and 3 x 16 bytes in flight per thread, 48 KB per SM).
UE_HD constexpr int unroll(Op op) { return num_teachers(op) == 0 ? 4 : num_teachers(op) == 1 ? 2 : 1; }

// ---- conversions and memory access ---------------------------------------------------

UE_HD float half_to_float(uint16_t h) {
#if defined(__CUDACC__)
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
#else
  _Float16 x;
  std::memcpy(&x, &h, sizeof x);
  return static_cast<float>(x);
#endif
}

UE_HD uint16_t float_to_half(float f) {
#if defined(__CUDACC__)
  const __half_raw r = __half_raw(__float2half_rn(f));
  return r.x;
#else
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, sizeof h);
  return h;
#endif
}

struct alignas(16) Raw16 {
  uint32_t w[4];
};

// Element i of a 16-byte vector of path P, as float, and its inverse.
template <Path P>
UE_HD float vec_get(const Raw16& r, int i) {
  if constexpr (P == Path::kFloat32) {
    return bits_to_float(r.w[i]);
  } else {
    const uint16_t b = static_cast<uint16_t>(r.w[i >> 1] >> ((i & 1) * 16));
    return P == Path::kBFloat16 ? bf16_to_float(b) : half_to_float(b);
  }
}
template <Path P>
UE_HD void vec_set(Raw16& r, int i, float x) {  // r starts zeroed
  if constexpr (P == Path::kFloat32) {
    r.w[i] = float_to_bits(x);
  } else {
    const uint16_t b = P == Path::kBFloat16 ? float_to_bf16(x) : float_to_half(x);
    r.w[i >> 1] |= static_cast<uint32_t>(b) << ((i & 1) * 16);
  }
}

// A whole vector from floats: on sm_80 and later two elements per conversion instruction
// (cvt.rn.{bf16,f16}x2.f32: round to nearest even, as vec_set; a NaN stays a NaN).
template <Path P>
UE_HD void pack_vec(Raw16& r, const float (&x)[vec_elems(P)]) {
  if constexpr (P == Path::kFloat32) {
    UE_UNROLL
    for (int i = 0; i < 4; ++i) r.w[i] = float_to_bits(x[i]);
  } else {
    UE_UNROLL
    for (int i = 0; i < 4; ++i) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      if constexpr (P == Path::kBFloat16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r.w[i]) : "f"(x[2 * i + 1]), "f"(x[2 * i]));
      } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r.w[i]) : "f"(x[2 * i + 1]), "f"(x[2 * i]));
      }
#else
      r.w[i] = 0u;
      vec_set<P>(r, 2 * i, x[2 * i]);
      vec_set<P>(r, 2 * i + 1, x[2 * i + 1]);
#endif
    }
  }
}

// 16-byte load for pass 1, cached in L2 only (pass 2 may read it again from there).
UE_HD Raw16 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldcg(static_cast<const uint4*>(p));
  return Raw16{{v.x, v.y, v.z, v.w}};
#else
  Raw16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
#endif
}
// Last read of the data (pass 2, backward): evict-first, so that it leaves L2 to the rows
// that other blocks are about to re-read. Never the non-coherent path: the gradient may
// be written over these very addresses.
UE_HD Raw16 load16_last(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldcs(static_cast<const uint4*>(p));
  return Raw16{{v.x, v.y, v.z, v.w}};
#else
  return load16(p);
#endif
}
// Gradient stores stream past L2 for the same reason.
UE_HD void store16(void* p, const Raw16& r) {
#if defined(__CUDA_ARCH__)
  __stcs(static_cast<uint4*>(p), make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]));
#else
  std::memcpy(p, &r, sizeof r);
#endif
}

UE_HD char* elem_ptr(const RowView& v, int64_t off) {
  return static_cast<char*>(v.data) + off * dtype_bytes(v.dtype);
}
// The same where the dtype is the vector path's (known at compile time).
template <Path P>
UE_HD char* vec_ptr(const RowView& v, int64_t off) {
  return static_cast<char*>(v.data) + off * path_bytes(P);
}

// One element of any dtype, in the compute type T.
template <typename T>
UE_HD T load_elem(const RowView& v, int64_t off) {
  const void* p = elem_ptr(v, off);
  switch (v.dtype) {
    case DType::kFloat32: return static_cast<T>(*static_cast<const float*>(p));
    case DType::kBFloat16: return static_cast<T>(bf16_to_float(*static_cast<const uint16_t*>(p)));
    case DType::kFloat16: return static_cast<T>(half_to_float(*static_cast<const uint16_t*>(p)));
    default: return static_cast<T>(*static_cast<const double*>(p));
  }
}

template <typename T>
UE_HD void store_elem(const RowView& v, int64_t off, T x) {
  void* p = elem_ptr(v, off);
  switch (v.dtype) {
    case DType::kFloat32: *static_cast<float*>(p) = static_cast<float>(x); break;
    case DType::kBFloat16: *static_cast<uint16_t*>(p) = float_to_bf16(static_cast<float>(x)); break;
    case DType::kFloat16: *static_cast<uint16_t*>(p) = float_to_half(static_cast<float>(x)); break;
    default: *static_cast<double*>(p) = static_cast<double>(x); break;
  }
}

// ---- math functions handed to row_math.h ------------------------------------------------

// exp of every element: the hardware's ex2.approx on x·log2(e) (a few ulp where the result
// matters: row_math.h only takes exp of differences to a maximum). The host build mimics
// it (same float product, subnormal results flushed) so that the emulator sees its errors.
struct FastExp {
  UE_HDM float operator()(float x) const {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    const float y = std::exp2(x * 1.44269504088896341f);
    return y < FLT_MIN ? 0.0f : y;
#endif
  }
  UE_HDM double operator()(double x) const { return ::exp(x); }
};
// 2^x as the hardware's ex2.approx.ftz (subnormal results flushed to 0), for the hot
// loops, whose callers scale the argument by log2(e) themselves: __expf would add a
// range test and two multiplies around every exponential.
UE_HDM float exp2_ftz(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.0f : y;
#endif
}
constexpr float kLog2e = 1.44269504088896341f;

// Once per row: the precise functions.
struct Exp {
  UE_HDM float operator()(float x) const { return ::expf(x); }
  UE_HDM double operator()(double x) const { return ::exp(x); }
};
struct Log {
  UE_HDM float operator()(float x) const { return ::logf(x); }
  UE_HDM double operator()(double x) const { return ::log(x); }
};
struct Log1p {
  UE_HDM float operator()(float x) const { return ::log1pf(x); }
  UE_HDM double operator()(double x) const { return ::log1p(x); }
};
struct Expm1 {
  UE_HDM float operator()(float x) const { return ::expm1f(x); }
  UE_HDM double operator()(double x) const { return ::expm1(x); }
};
struct Tanh {
  UE_HDM float operator()(float x) const { return ::tanhf(x); }
  UE_HDM double operator()(double x) const { return ::tanh(x); }
};
// The per-element functions row_math.h's gradients and JSD terms take.
struct ElemMath {
  template <typename T>
  UE_HDM T exp(T x) const { return FastExp{}(x); }
  template <typename T>
  UE_HDM T log(T x) const { return Log{}(x); }
  template <typename T>
  UE_HDM T log1p(T x) const { return Log1p{}(x); }
  template <typename T>
  UE_HDM T expm1(T x) const { return Expm1{}(x); }
};

// ---- one row --------------------------------------------------------------------------

// A launch's scalar parameters in the compute type (row_math.h, RowConsts).
template <typename T>
using Params = RowConsts<T>;

template <typename T>
UE_HD Params<T> params_of(const RowArgs& a) {
  return consts_of<T>(a);
}

// Where row r lies in each tensor and which of its elements go as vectors.
struct RowPlan {
  int64_t off[4];     // element offset of the row in student, teacher, teacher2, grad
  int64_t label;      // the row's label, or -1 (none, or outside [0, V))
  int64_t vec_begin;  // first element of the vectorised part
  int64_t nvec;       // its length in 16-byte vectors (0: every element goes one by one)
};

UE_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// uses_grad: the pass writes the gradient (its alignment then counts too).
template <Op op, Path P>
UE_HD RowPlan plan_row(const RowArgs& a, int64_t r, bool uses_grad) {
  // All views of a launch share inner_rows (launch_config checks); split r once, with a
  // 32-bit division where it fits (a 64-bit one costs ~70 instructions on the GPU).
  const int64_t n = a.student.inner_rows;
  int64_t outer, inner;
  if (((r | n) >> 31) == 0) {
    outer = static_cast<uint32_t>(r) / static_cast<uint32_t>(n);
    inner = r - outer * n;
  } else {
    outer = r / n;
    inner = r - outer * n;
  }
  RowPlan p;
  p.off[0] = row_offset(a.student, outer, inner);
  p.off[1] = num_teachers(op) >= 1 ? row_offset(a.teacher, outer, inner) : 0;
  p.off[2] = num_teachers(op) >= 2 ? row_offset(a.teacher2, outer, inner) : 0;
  p.off[3] = uses_grad ? row_offset(a.grad, outer, inner) : 0;
  p.label = row_label(a, r);
  p.vec_begin = 0;
  p.nvec = 0;
  if constexpr (P != Path::kScalar) {
    constexpr int B = path_bytes(P);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(elem_ptr(a.student, p.off[0]));
    const uintptr_t head = (16u - (addr & 15u)) & 15u;  // bytes to the next 16-byte boundary
    if (head % B == 0) {
      const int64_t h = static_cast<int64_t>(head / B) < a.vocab ? static_cast<int64_t>(head / B) : a.vocab;
      bool ok = true;
      if (num_teachers(op) >= 1) ok = ok && aligned16(elem_ptr(a.teacher, p.off[1] + h));
      if (num_teachers(op) >= 2) ok = ok && aligned16(elem_ptr(a.teacher2, p.off[2] + h));
      if (uses_grad) ok = ok && aligned16(elem_ptr(a.grad, p.off[3] + h));
      if (ok) {
        p.vec_begin = h;
        p.nvec = (a.vocab - h) / vec_elems(P);
      }
    }
  }
  return p;
}

// The elements that go one by one: [0, vec_begin) and [vec_end, V), numbered 0.. .
UE_HD int64_t scalar_count(const RowPlan& p, int64_t vocab, int n_per_vec) {
  return vocab - p.nvec * n_per_vec;
}
UE_HD int64_t scalar_index(const RowPlan& p, int64_t i, int n_per_vec) {
  return i < p.vec_begin ? i : i + p.nvec * n_per_vec;
}

// A thread's 16-byte vectors of one tile, per input tensor (student, teacher, teacher2).
template <Op op, Path P>
struct Tile {
  static constexpr int kInputs = 1 + num_teachers(op);
  static constexpr int kUnroll = unroll(op);
  Raw16 v[kInputs][kUnroll];
};

// Shared memory that keeps a row on chip between the forward's passes (the on-chip path,
// for rows that fit: row_dispatch.h's stage_capacity): input k's vector v of the row at
// v[k * per_input + v]. Each thread writes in pass 1 exactly the slots it reads back in
// pass 2 (the same vectors: thread tid takes vectors start + u * nthreads + tid in every
// walk), so no barrier orders them; the next row's pass 1 comes after in the same thread.
struct Stage {
  Raw16* v;
  int64_t per_input;
};

// Where load_tile reads a tile: memory (pass 1; evict-first for the last read of the
// data), memory and also into the stage (pass 1 of an on-chip row), the stage (the
// passes after pass 1 of an on-chip row: no memory read).
enum class Src : int { kMemory, kMemoryLast, kMemoryToStage, kStage };

// Loads the thread's vectors of the tile starting at vector `start` (all loads issued
// before any is used). guarded: the tile may end past the row (else every vector is in it).
template <Op op, Path P, Src src, bool guarded = true>
UE_HD void load_tile(const RowArgs& a, const RowPlan& p, int64_t start, int tid, int nthreads, Tile<op, P>& tile,
                     const Stage& stage) {
  constexpr int N = vec_elems(P);
  const RowView* views[3] = {&a.student, &a.teacher, &a.teacher2};
  UE_UNROLL
  for (int u = 0; u < Tile<op, P>::kUnroll; ++u) {
    const int64_t v = start + static_cast<int64_t>(u) * nthreads + tid;
    if (!guarded || v < p.nvec) {
      UE_UNROLL
      for (int k = 0; k < Tile<op, P>::kInputs; ++k) {
        if constexpr (src == Src::kStage) {
          tile.v[k][u] = stage.v[k * stage.per_input + v];
        } else {
          const void* ptr = vec_ptr<P>(*views[k], p.off[k] + p.vec_begin + v * N);
          tile.v[k][u] = src == Src::kMemoryLast ? load16_last(ptr) : load16(ptr);
          if constexpr (src == Src::kMemoryToStage) stage.v[k * stage.per_input + v] = tile.v[k][u];
        }
      }
    }
  }
}

// The source of pass 1 and of the passes after it, for a row staged on chip or not.
template <bool staged>
constexpr Src kFirstRead = staged ? Src::kMemoryToStage : Src::kMemory;
template <bool staged>
constexpr Src kReRead = staged ? Src::kStage : Src::kMemoryLast;

// Student and teacher logits of one vector (or element), divided by the temperature;
// the student softcapped first (dc: the softcap's derivative), the teacher built from its
// raw inputs first (RKLD; UnDIAL's gamma at the label).
template <Op op, typename T, Path P>
UE_HD void unpack(const Tile<op, P>& tile, int u, int64_t j0, int64_t label, const Params<T>& q,
                  T (&s)[vec_elems(P)], T (&t)[vec_elems(P)], T (&dc)[vec_elems(P)]) {
  UE_UNROLL
  for (int e = 0; e < vec_elems(P); ++e) {
    s[e] = student_logit(static_cast<T>(vec_get<P>(tile.v[0][u], e)), q, dc[e], Tanh{});
    if constexpr (num_teachers(op) >= 1) {
      const T t1 = static_cast<T>(vec_get<P>(tile.v[1][u], e));
      T t2 = T(0);
      if constexpr (num_teachers(op) >= 2) t2 = static_cast<T>(vec_get<P>(tile.v[2][u], e));
      t[e] = teacher_logit<op, T>(t1, t2, j0 + e == label, q.alpha, q.gamma) * q.inv_temperature;
    } else {
      t[e] = s[e];  // no teacher: unused
    }
  }
}

template <Op op, typename T>
UE_HD void load_one(const RowArgs& a, const RowPlan& p, int64_t j, const Params<T>& q, T (&s)[1], T (&t)[1],
                    T (&dc)[1]) {
  s[0] = student_logit(load_elem<T>(a.student, p.off[0] + j), q, dc[0], Tanh{});
  if constexpr (num_teachers(op) >= 1) {
    const T t1 = load_elem<T>(a.teacher, p.off[1] + j);
    const T t2 = num_teachers(op) >= 2 ? load_elem<T>(a.teacher2, p.off[2] + j) : T(0);
    t[0] = teacher_logit<op, T>(t1, t2, j == p.label, q.alpha, q.gamma) * q.inv_temperature;
  } else {
    t[0] = s[0];
  }
}

// Adds n consecutive elements (from j0) to a thread's state: maxima first, the state moved
// to them, then the sums. The token ops count the label in the maximum but not in ss.
template <Op op, typename T, int n>
UE_HD void accumulate(RowState<T>& st, const T (&s)[n], const T (&t)[n], int64_t j0, int64_t label) {
  T ms = st.ms, mt = st.mt;
  UE_UNROLL
  for (int e = 0; e < n; ++e) {
    ms = s[e] > ms ? s[e] : ms;  // NaN never wins: it reaches the sums instead
    if constexpr (num_teachers(op) >= 1) mt = t[e] > mt ? t[e] : mt;
  }
  if (ms != st.ms || mt != st.mt) rescale<op>(st, ms, mt, FastExp{});
  const T ms0 = safe_max(ms), mt0 = safe_max(mt);
  UE_UNROLL
  for (int e = 0; e < n; ++e) {
    T es = FastExp{}(s[e] - ms0);
    if constexpr (op == Op::kCrossEntropy) {  // label smoothing's sum; st counts the elements
      st.acc += acc_term<op, T>(s[e], T(0), T(0), T(0), ms0, T(0));
      st.st += T(1);
    }
    if constexpr (reads_label_logit(op)) es = j0 + e == label ? T(0) : es;
    st.ss += es;
    if constexpr (num_teachers(op) >= 1) {
      const T et = FastExp{}(t[e] - mt0);
      st.st += et;
      st.acc += acc_term<op, T>(s[e], t[e], es, et, ms0, mt0);
    }
  }
}

// Calls f(s, t, dc, j0) for each of the thread's vectors in the tile at vector `start`
// (already in `tile`): its logits divided by the temperature, teacher built, the softcap's
// derivative, first element j0.
template <Op op, typename T, Path P, typename F>
UE_HD void for_tile(const Tile<op, P>& tile, const RowPlan& p, const Params<T>& q, int64_t start, int tid,
                    int nthreads, F&& f) {
  constexpr int N = vec_elems(P);
  UE_UNROLL
  for (int u = 0; u < Tile<op, P>::kUnroll; ++u) {
    const int64_t v = start + static_cast<int64_t>(u) * nthreads + tid;
    if (v < p.nvec) {
      T s[N], t[N], dc[N];
      const int64_t j0 = p.vec_begin + v * N;
      unpack<op, T, P>(tile, u, j0, p.label, q, s, t, dc);
      f(s, t, dc, j0);
    }
  }
}

// Calls f(s, t, dc, j) (one-element arrays) for each of the thread's elements outside vectors.
template <Op op, typename T, Path P, typename F>
UE_HD void for_scalars(const RowArgs& a, const RowPlan& p, const Params<T>& q, int tid, int nthreads, F&& f) {
  const int64_t count = scalar_count(p, a.vocab, vec_elems(P));
  for (int64_t i = tid; i < count; i += nthreads) {
    const int64_t j = scalar_index(p, i, vec_elems(P));
    T s[1], t[1], dc[1];
    load_one<op, T>(a, p, j, q, s, t, dc);
    f(s, t, dc, j);
  }
}

// ---- the hot loops: full tiles of a long row -----------------------------------------
// Every vector of a full tile lies in the row and none holds the label (the tile that
// holds it, and the row's last, partial tile, go through the general code above), so the
// per-element work has no bounds or label test. Per element: the raw value unpacked,
// fmaxf for the maxima (NaN never wins: it reaches the sums), the shift s/tau - m as one
// FFMA (one rounding: logits of 1e4 keep their digits), exp as ex2.approx.ftz of the shift
// times log2(e). 1/tau is folded into that FFMA (the maxima of the raw values, scaled once
// per tile: 1/tau > 0 keeps their order), so tau = 1 costs nothing. The state moves to
// the tile's maxima once per tile, branch-free.

// Whether a launch's full tiles take the hot loops below: the plain losses. A softcap,
// cross entropy's label smoothing or z-loss, and JSD take the general code for every tile.
template <Op op>
UE_HD bool fast_tiles(const Params<float>& q) {
  return op != Op::kJSD && q.softcap == 0.0f &&
         (op != Op::kCrossEntropy || (q.smoothing == 0.0f && q.z_scale == 0.0f));
}
template <Op op>
UE_HD bool fast_tiles(const Params<double>&) {
  return false;
}

// The tile that holds the label (token ops: left out of ss; UnDIAL: its teacher is
// shifted there), as its first vector, or -1.
template <Op op, Path P>
UE_HD int64_t label_tile(const RowPlan& p, int64_t step) {
  if (!needs_label(op) || p.label < p.vec_begin) return -1;
  const int64_t v = (p.label - p.vec_begin) / vec_elems(P);
  return v < p.nvec ? v / step * step : -1;
}

// row_math.h's rescale without a branch: the factor 2^((old - new) log2 e) is exactly 1
// when a maximum stays, and 0 when both are -inf (NaN difference; the sums are 0 then).
template <Op op>
UE_HD void rescale_tile(RowState<float>& r, float ms, float mt) {
  const float fs = exp2_ftz(fmaxf(r.ms - ms, -INFINITY) * kLog2e);
  const float ft = exp2_ftz(fmaxf(r.mt - mt, -INFINITY) * kLog2e);
  const float ds = safe_max(r.ms) - safe_max(ms);  // old shift - new shift (<= 0)
  const float dt = safe_max(r.mt) - safe_max(mt);
  r.ss *= fs;
  if constexpr (num_teachers(op) >= 1) r.st *= ft;
  if constexpr (op == Op::kForwardKL) {
    r.acc = r.acc * ft + (dt - ds) * r.st;
  } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
    r.acc = r.acc * fs + (ds - dt) * r.ss;
  } else if constexpr (op == Op::kUnDIAL) {
    r.acc = r.acc * ft + ds * r.st;
  }
  r.ms = ms;
  r.mt = mt;
}

// Pass 1 over a full tile already in `tile`.
template <Op op, Path P>
UE_HD void accumulate_full_tile(RowState<float>& st, const Tile<op, P>& tile, const Params<float>& q) {
  constexpr int N = vec_elems(P), U = Tile<op, P>::kUnroll;
  float s[U][N], t[U][N];
  float ms_raw = -INFINITY, mt_raw = -INFINITY;
  UE_UNROLL
  for (int u = 0; u < U; ++u) {
    UE_UNROLL
    for (int e = 0; e < N; ++e) {
      s[u][e] = vec_get<P>(tile.v[0][u], e);
      ms_raw = fmaxf(ms_raw, s[u][e]);
      if constexpr (num_teachers(op) >= 1) {
        const float t2 = num_teachers(op) >= 2 ? vec_get<P>(tile.v[num_teachers(op)][u], e) : 0.0f;
        t[u][e] = teacher_logit<op, float>(vec_get<P>(tile.v[1][u], e), t2, false, q.alpha, q.gamma);
        mt_raw = fmaxf(mt_raw, t[u][e]);
      }
    }
  }
  rescale_tile<op>(st, fmaxf(st.ms, ms_raw * q.inv_temperature), fmaxf(st.mt, mt_raw * q.inv_temperature));
  const float ms0 = safe_max(st.ms), mt0 = safe_max(st.mt);
  UE_UNROLL
  for (int u = 0; u < U; ++u) {
    UE_UNROLL
    for (int e = 0; e < N; ++e) {
      const float ds = fmaf(s[u][e], q.inv_temperature, -ms0);
      const float es = exp2_ftz(ds * kLog2e);
      st.ss += es;
      if constexpr (num_teachers(op) >= 1) {
        const float dt = fmaf(t[u][e], q.inv_temperature, -mt0);
        const float et = exp2_ftz(dt * kLog2e);
        st.st += et;
        if constexpr (op == Op::kForwardKL) {
          st.acc += et == 0.0f ? 0.0f : et * (dt - ds);
        } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
          st.acc += es == 0.0f ? 0.0f : es * (ds - dt);
        } else if constexpr (op == Op::kUnDIAL) {  // (JSD never comes here: fast_tiles)
          st.acc += et == 0.0f ? 0.0f : et * ds;
        }
      }
    }
  }
}

// Pass 2 over a full tile already in `tile`: the gradient (row_math.h's grad_elem, with
// the same exponentials as pass 1), stored as 16-byte vectors.
template <Op op, Path P>
UE_HD void grad_full_tile(const RowArgs& a, const RowPlan& p, const Tile<op, P>& tile, int64_t start, int tid,
                          int nthreads, const Params<float>& q, const float (&stats)[kNumStats], float g) {
  constexpr int N = vec_elems(P), U = Tile<op, P>::kUnroll;
  const float lse_s = stats[1] * kLog2e, lse_t = stats[3] * kLog2e;
  UE_UNROLL
  for (int u = 0; u < U; ++u) {
    Raw16 out;
    float gr[N];
    UE_UNROLL
    for (int e = 0; e < N; ++e) {
      const float s = vec_get<P>(tile.v[0][u], e);
      const float ds = fmaf(s, q.inv_temperature, -stats[0]);
      const float pr = exp2_ftz(fmaf(ds, kLog2e, -lse_s));
      float grad;
      if constexpr (num_teachers(op) == 0) {
        grad = op == Op::kTokenLogprob ? -g * pr : g * pr;
      } else {
        const float t2 = num_teachers(op) >= 2 ? vec_get<P>(tile.v[num_teachers(op)][u], e) : 0.0f;
        const float t = teacher_logit<op, float>(vec_get<P>(tile.v[1][u], e), t2, false, q.alpha, q.gamma);
        const float dt = fmaf(t, q.inv_temperature, -stats[2]);
        if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
          grad = pr == 0.0f ? 0.0f : g * pr * ((ds - dt) - stats[3]);
        } else {
          grad = g * (pr - exp2_ftz(fmaf(dt, kLog2e, -lse_t)));
        }
      }
      gr[e] = grad;
    }
    pack_vec<P>(out, gr);
    const int64_t v = start + static_cast<int64_t>(u) * nthreads + tid;
    store16(vec_ptr<P>(a.grad, p.off[3] + p.vec_begin + v * N), out);
  }
}

// Whether the row fits in registers: one tile of vectors (each thread holds all of its
// vectors) and no more than a vector's worth of elements around them. Such a row takes
// its maxima first and its sums after (thread_max, block maxima, thread_sums): nothing
// is rescaled, so the sums are exactly those of a pass with known maxima, as in the CPU
// kernels' blocks (a KL gradient of a row that one token dominates then cancels exactly).
// Longer rows are read once with online rescaling (thread_state).
template <Op op, Path P>
UE_HD bool fits_registers(const RowPlan& p, int64_t vocab, int nthreads) {
  return P != Path::kScalar && p.nvec <= static_cast<int64_t>(nthreads) * unroll(op) &&
         scalar_count(p, vocab, vec_elems(P)) < 2 * vec_elems(P);
}

// A row that fits in registers, pass 1a: loads the thread's tile; the thread's maxima.
template <Op op, typename T, Path P>
UE_HD void thread_max(const RowArgs& a, const RowPlan& p, const Params<T>& q, int tid, int nthreads,
                      Tile<op, P>& tile, T& ms, T& mt) {
  ms = neg_inf<T>();
  mt = neg_inf<T>();
  auto add = [&](const auto& s, const auto& t, const auto&, int64_t) {
    UE_UNROLL
    for (int e = 0; e < static_cast<int>(sizeof(s) / sizeof(s[0])); ++e) {
      ms = s[e] > ms ? s[e] : ms;
      if constexpr (num_teachers(op) >= 1) mt = t[e] > mt ? t[e] : mt;
    }
  };
  load_tile<op, P, Src::kMemory>(a, p, 0, tid, nthreads, tile, Stage{nullptr, 0});
  for_tile<op, T, P>(tile, p, q, 0, tid, nthreads, add);
  for_scalars<op, T, P>(a, p, q, tid, nthreads, add);
}

// Pass 1b: the thread's sums with the row's maxima, from its tile.
template <Op op, typename T, Path P>
UE_HD RowState<T> thread_sums(const RowArgs& a, const RowPlan& p, const Params<T>& q, int tid, int nthreads,
                              const Tile<op, P>& tile, T ms, T mt) {
  RowState<T> st{ms, mt, T(0), T(0), T(0)};
  auto add = [&](const auto& s, const auto& t, const auto&, int64_t j0) { accumulate<op, T>(st, s, t, j0, p.label); };
  for_tile<op, T, P>(tile, p, q, 0, tid, nthreads, add);
  for_scalars<op, T, P>(a, p, q, tid, nthreads, add);
  return st;
}

// Pass 1 of a longer row: the thread's state over its share, online. Leaves the thread's
// last tile in `tile` for pass 2; staged: also copies its vectors into the stage.
template <Op op, typename T, Path P, bool staged>
UE_HD RowState<T> thread_state(const RowArgs& a, const RowPlan& p, const Params<T>& q, int tid, int nthreads,
                               Tile<op, P>& tile, const Stage& stage) {
  RowState<T> st = empty_state<T>();
  auto add = [&](const auto& s, const auto& t, const auto&, int64_t j0) { accumulate<op, T>(st, s, t, j0, p.label); };
  if constexpr (P != Path::kScalar) {
    static_assert(std::is_same<T, float>::value, "vector paths compute in float");
    const int64_t step = static_cast<int64_t>(nthreads) * Tile<op, P>::kUnroll;
    const int64_t full_end = p.nvec / step * step, at_label = label_tile<op, P>(p, step);
    auto full_tiles = [&](int64_t begin, int64_t end) {
      for (int64_t start = begin; start < end; start += step) {
        load_tile<op, P, kFirstRead<staged>, false>(a, p, start, tid, nthreads, tile, stage);
        accumulate_full_tile<op, P>(st, tile, q);
      }
    };
    auto general_tile = [&](int64_t start) {
      load_tile<op, P, kFirstRead<staged>>(a, p, start, tid, nthreads, tile, stage);
      for_tile<op, T, P>(tile, p, q, start, tid, nthreads, add);
    };
    if (!fast_tiles<op>(q)) {
      for (int64_t start = 0; start < p.nvec; start += step) general_tile(start);
    } else if (at_label >= 0 && at_label < full_end) {
      full_tiles(0, at_label);
      general_tile(at_label);
      full_tiles(at_label + step, full_end);
    } else {
      full_tiles(0, full_end);
    }
    if (fast_tiles<op>(q) && full_end < p.nvec) general_tile(full_end);  // loaded last: cached for pass 2
  }
  for_scalars<op, T, P>(a, p, q, tid, nthreads, add);
  return st;
}

// Once the block has merged its threads' states: the row's loss and statistics
// (finalize), NaN for a row whose needed label is invalid.
template <Op op, typename T>
UE_HD T finish_row(const RowPlan& p, const RowState<T>& st, T s_label, const Params<T>& q, T (&stats)[kNumStats]) {
  const T value = finalize<op, T>(st, s_label, stats, q, Exp{}, Log{}, Log1p{});
  return needs_label(op) && p.label < 0 ? T(NAN) : value;
}

// The student's logit at the label (token ops), read before pass 2 may overwrite the row.
template <Op op, typename T>
UE_HD T label_logit(const RowArgs& a, const RowPlan& p, const Params<T>& q) {
  if (!reads_label_logit(op) || p.label < 0) return T(0);
  T unused;
  return student_logit(load_elem<T>(a.student, p.off[0] + p.label), q, unused, Tanh{});
}

// The gradient w.r.t. one raw logit: row_math.h's w.r.t. the scaled one, times the
// softcap's derivative dc (1 without a softcap).
template <Op op, typename T>
UE_HD T grad_at(T s, T t, T dc, int64_t j, int64_t label, const T (&stats)[kNumStats], T g, const Params<T>& q) {
  T out;
  if (reads_label_logit(op) && j == label) {
    out = grad_at_label<op, T>(stats, g, q, ElemMath{});
  } else {
    out = grad_elem<op, T>(s, t, stats, g, q, ElemMath{});
  }
  return q.softcap == T(0) ? out : out * dc;
}

// JSD's second pass (row_math.h, jsd_terms), once the block has both log-sums: the
// thread's shares of the loss and of E_p[b], tiles in reverse order as in thread_grad
// (tile_cached: `tile` holds the thread's last tile; staged: the others come from the
// stage, else from L2, kept there for the gradient pass). Leaves the first tile in `tile`.
template <Op op, typename T, Path P, bool staged>
UE_HD void thread_jsd(const RowArgs& a, const RowPlan& p, const Params<T>& q, int tid, int nthreads,
                      const T (&stats)[kNumStats], Tile<op, P>& tile, bool tile_cached, const Stage& stage, T& value,
                      T& pb) {
  value = T(0);
  pb = T(0);
  auto add = [&](const auto& s, const auto& t, const auto&, int64_t) {
    UE_UNROLL
    for (int e = 0; e < static_cast<int>(sizeof(s) / sizeof(s[0])); ++e) {
      T v, b;
      jsd_terms(s[e], t[e], stats, q, ElemMath{}, v, b);
      value += v;
      pb += b;
    }
  };
  if constexpr (P != Path::kScalar) {
    const int64_t step = static_cast<int64_t>(nthreads) * Tile<op, P>::kUnroll;
    const int64_t last = p.nvec > 0 ? (p.nvec - 1) / step * step : -1;
    for (int64_t start = last; start >= 0; start -= step) {
      if (!(tile_cached && start == last))
        load_tile<op, P, staged ? Src::kStage : Src::kMemory>(a, p, start, tid, nthreads, tile, stage);
      for_tile<op, T, P>(tile, p, q, start, tid, nthreads, add);
    }
  }
  for_scalars<op, T, P>(a, p, q, tid, nthreads, add);
}

// Whether the thread's share of the row is a single tile (so that a tile left in
// registers by one walk is also the last one of the next).
template <Op op, Path P>
UE_HD bool single_tile(const RowPlan& p, int nthreads) {
  return p.nvec <= static_cast<int64_t>(nthreads) * unroll(op);
}

// Pass 2: writes the gradient of the thread's share of the row, g times d(loss)/d(logits)
// (g includes 1/temperature), tiles in reverse order. tile_cached: `tile` still holds the
// thread's last tile from pass 1; staged: the other tiles come from the stage (nothing
// of the vectorised row is read from memory), else from L2 or memory.
template <Op op, typename T, Path P, bool staged>
UE_HD void thread_grad(const RowArgs& a, const RowPlan& p, const Params<T>& q, int tid, int nthreads, T g,
                       const T (&stats)[kNumStats], Tile<op, P>& tile, bool tile_cached, const Stage& stage) {
  if constexpr (P != Path::kScalar) {
    constexpr int N = vec_elems(P);
    const int64_t step = static_cast<int64_t>(nthreads) * Tile<op, P>::kUnroll;
    auto general_tile = [&](int64_t start, bool cached) {
      if (!cached) load_tile<op, P, kReRead<staged>>(a, p, start, tid, nthreads, tile, stage);
      for_tile<op, T, P>(tile, p, q, start, tid, nthreads, [&](const T (&s)[N], const T (&t)[N], const T (&dc)[N],
                                                               int64_t j0) {
        Raw16 out{{0u, 0u, 0u, 0u}};
        UE_UNROLL
        for (int e = 0; e < N; ++e)
          vec_set<P>(out, e, static_cast<float>(grad_at<op, T>(s[e], t[e], dc[e], j0 + e, p.label, stats, g, q)));
        store16(vec_ptr<P>(a.grad, p.off[3] + j0), out);
      });
    };
    if (!fast_tiles<op>(q)) {  // every tile through the general code
      const int64_t last = p.nvec > 0 ? (p.nvec - 1) / step * step : -1;
      for (int64_t start = last; start >= 0; start -= step) general_tile(start, tile_cached && start == last);
    } else {
      // Full tiles from `from` down to `to` (tile starts, from >= to), none cached.
      auto full_tiles = [&](int64_t from, int64_t to) {
        for (int64_t start = from; start >= to; start -= step) {
          load_tile<op, P, kReRead<staged>, false>(a, p, start, tid, nthreads, tile, stage);
          grad_full_tile<op, P>(a, p, tile, start, tid, nthreads, q, stats, g);
        }
      };
      const int64_t full_end = p.nvec / step * step, at_label = label_tile<op, P>(p, step);
      int64_t top = full_end - step;  // the next full tile to write, downwards
      if (full_end < p.nvec) {
        general_tile(full_end, tile_cached);
      } else if (tile_cached && top >= 0) {  // the last full tile is still in registers
        if (top == at_label) {
          general_tile(top, true);
        } else {
          grad_full_tile<op, P>(a, p, tile, top, tid, nthreads, q, stats, g);
        }
        top -= step;
      }
      if (at_label >= 0 && at_label <= top) {
        full_tiles(top, at_label + step);
        general_tile(at_label, false);
        top = at_label - step;
      }
      full_tiles(top, 0);
    }
  }
  for_scalars<op, T, P>(a, p, q, tid, nthreads, [&](const T (&s)[1], const T (&t)[1], const T (&dc)[1], int64_t j) {
    store_elem<T>(a.grad, p.off[3] + j, grad_at<op, T>(s[0], t[0], dc[0], j, p.label, stats, g, q));
  });
}

// An ignored row's gradient: exactly zero.
template <Path P>
UE_HD void thread_zero_grad(const RowArgs& a, const RowPlan& p, int tid, int nthreads) {
  constexpr int N = vec_elems(P);
  if constexpr (P != Path::kScalar) {
    for (int64_t v = tid; v < p.nvec; v += nthreads)
      store16(vec_ptr<P>(a.grad, p.off[3] + p.vec_begin + v * N), Raw16{{0u, 0u, 0u, 0u}});
  }
  const int64_t count = scalar_count(p, a.vocab, N);
  for (int64_t i = tid; i < count; i += nthreads) store_elem<float>(a.grad, p.off[3] + scalar_index(p, i, N), 0.0f);
}

// The gradient factor g of a row (upstream gradient times 1/temperature), NaN where the
// needed label is invalid.
template <Op op, typename T>
UE_HD T row_grad_factor(const RowPlan& p, T g) {
  return needs_label(op) && p.label < 0 ? T(NAN) : g;
}

}  // namespace cuda
}  // namespace unlearn_ext
