// Per-element and per-row math of every row op, written once for the CPU and CUDA kernels.
//
// A row op reads one row of student logits s (and, for distillation ops, the teacher's
// logits t), keeps running maxima and rescaled sums (a RowState), and finishes with the
// row's loss and a few float statistics that the gradient pass needs. Every function here
// is a plain inline function of scalars, so the CPU kernels can vectorise loops over them
// and the CUDA kernels can call them per thread and merge states across threads.
//
// Conventions (DESIGN.md): logits are already divided by the temperature; -inf is a legal
// (masked) logit; a NaN anywhere in a row makes the row's loss NaN.
#pragma once

#include <cmath>
#include <cstdint>

// Internal linkage on purpose: the CPU kernels are compiled once per instruction set
// (csrc/cpu/row_kernels_*.cpp), and an inline function with external linkage would be
// merged across those objects by the linker, possibly into the AVX-512 copy.
#if defined(__CUDACC__)
#define UE_HD static __host__ __device__ __forceinline__
#else
#define UE_HD static inline
#endif

namespace unlearn_ext {

// Kernel op codes; the Python layer passes the same names (see kOpNames).
enum class Op : int {
  kTokenLogprob = 0,  // s_y - lse(s)
  kCrossEntropy = 1,  // lse(s) - s_y
  kForwardKL = 2,     // KL(q || p)
  kReverseKL = 3,     // KL(p || q)
  kRKLD = 4,          // KL(p || q), teacher o - alpha * relu(a - o) built on load
  kUnDIAL = 5,        // soft-label CE to softmax(t - gamma * onehot(y))
};

constexpr int kNumOps = 6;
constexpr const char* kOpNames[kNumOps] = {"token_logprob", "cross_entropy", "forward_kl",
                                           "reverse_kl",    "rkld",          "undial"};

// How many teacher inputs an op reads (RKLD: original and augmented logits).
UE_HD constexpr int num_teachers(Op op) {
  return op == Op::kRKLD ? 2 : (op == Op::kTokenLogprob || op == Op::kCrossEntropy) ? 0 : 1;
}
// Ops whose value needs the label (token ops) or whose teacher depends on it (UnDIAL).
UE_HD constexpr bool reads_label_logit(Op op) {
  return op == Op::kTokenLogprob || op == Op::kCrossEntropy;
}
// Ops that need a valid label: a row without one gets NaN (the bindings refuse such labels
// where checking them is free; a kernel never reads out of bounds).
UE_HD constexpr bool needs_label(Op op) { return reads_label_logit(op) || op == Op::kUnDIAL; }

template <typename T>
UE_HD T neg_inf() {
  return -INFINITY;
}

// A maximum that is safe to subtract: a row that is -inf so far shifts by 0, so that
// exp(-inf - 0) = 0 instead of exp(-inf - -inf) = NaN.
template <typename T>
UE_HD T safe_max(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// The teacher logit at one position, from the raw loaded values (before 1/temperature):
//  RKLD:   o - alpha * relu(a - o); a masked original (o = -inf) stays masked, which also
//          avoids -inf - -inf when both are masked. `d < 0 ? 0 : d` keeps a NaN a NaN.
//  UnDIAL: t - gamma at the label (subtracted on load, never corrected afterwards).
template <Op op, typename T>
UE_HD T teacher_logit(T t, T t2, bool at_label, T alpha, T gamma) {
  if constexpr (op == Op::kRKLD) {
    if (t == neg_inf<T>()) return t;
    T d = t2 - t;
    return t - alpha * (d < T(0) ? T(0) : d);
  } else if constexpr (op == Op::kUnDIAL) {
    return at_label ? t - gamma : t;
  } else {
    (void)t2; (void)at_label; (void)alpha; (void)gamma;
    return t;
  }
}

// Running statistics of one row (or part of a row):
//   ms, mt  running maxima of s and t; every shift below uses them made safe (safe_max)
//   ss, st  sum exp(s - ms), sum exp(t - mt); for the token ops ss leaves out the label's
//           own term (ms still covers it), so that log p_y = -log1p(ss exp(ms - s_y))
//           keeps its digits when p_y ~ 1
//   acc     the op's weighted sum, of logits shifted by their maxima so that two nearly
//           equal distributions (KL ~ 1e-8 between logits of size 30, or logits of 1e4)
//           are not lost to cancellation:
//     forward KL  sum exp(t - mt) ((t - mt) - (s - ms))   KL = acc/st + log ss - log st
//     reverse KL  sum exp(s - ms) ((s - ms) - (t - mt))   KL = acc/ss + log st - log ss
//     UnDIAL      sum exp(t - mt) (s - ms)                CE = log ss - acc/st
template <typename T>
struct RowState {
  T ms, mt, ss, st, acc;
};

template <typename T>
UE_HD RowState<T> empty_state() {
  return RowState<T>{neg_inf<T>(), neg_inf<T>(), T(0), T(0), T(0)};
}

// One element's contribution to `acc`, given es = exp(s - ms0), et = exp(t - mt0) and the
// safe maxima ms0, mt0. A zero weight contributes exactly 0 even where the other factor is
// infinite (masked logits): 0 * log 0 = 0.
template <Op op, typename T>
UE_HD T acc_term(T s, T t, T es, T et, T ms0, T mt0) {
  if constexpr (op == Op::kForwardKL) {
    return et == T(0) ? T(0) : et * ((t - mt0) - (s - ms0));
  } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
    return es == T(0) ? T(0) : es * ((s - ms0) - (t - mt0));
  } else if constexpr (op == Op::kUnDIAL) {
    (void)es; (void)mt0;
    return et == T(0) ? T(0) : et * (s - ms0);
  } else {
    (void)s; (void)t; (void)es; (void)et; (void)ms0; (void)mt0;
    return T(0);
  }
}

// Moves a state to larger maxima (ms >= r.ms, mt >= r.mt): rescales the sums and moves
// acc's shifts, sum w (x - old) = sum w (x - new) + (new - old) sum w.
// `exp_fn` is the caller's exponential (vectorised on the CPU, fast-math on the GPU).
template <Op op, typename T, typename Exp>
UE_HD void rescale(RowState<T>& r, T ms, T mt, Exp exp_fn) {
  const T fs = r.ms == ms ? T(1) : exp_fn(r.ms - ms);
  const T ft = r.mt == mt ? T(1) : exp_fn(r.mt - mt);
  const T ds = safe_max(r.ms) - safe_max(ms);  // old shift - new shift (<= 0)
  const T dt = safe_max(r.mt) - safe_max(mt);
  r.ss *= fs;
  r.st *= ft;
  if constexpr (op == Op::kForwardKL) {
    r.acc = r.acc * ft + (dt - ds) * r.st;
  } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
    r.acc = r.acc * fs + (ds - dt) * r.ss;
  } else if constexpr (op == Op::kUnDIAL) {
    r.acc = r.acc * ft + ds * r.st;
  } else {
    (void)ds; (void)dt;
  }
  r.ms = ms;
  r.mt = mt;
}

// Combines two partial states of the same row (blocks on the CPU, threads on the GPU).
template <Op op, typename T, typename Exp>
UE_HD RowState<T> merge(RowState<T> a, RowState<T> b, Exp exp_fn) {
  // NaN never wins a comparison, so a NaN maximum cannot appear here; NaN logits reach
  // the result through the sums instead (exp(NaN - m) = NaN).
  const T ms = a.ms > b.ms ? a.ms : b.ms;
  const T mt = a.mt > b.mt ? a.mt : b.mt;
  rescale<op>(a, ms, mt, exp_fn);
  rescale<op>(b, ms, mt, exp_fn);
  return RowState<T>{ms, mt, a.ss + b.ss, a.st + b.st, a.acc + b.acc};
}

// How many per-row statistics the forward saves for the backward (the same for every op).
// Maxima and log-sums are kept apart: lse = m + log(sum) rounded to one float would cost
// p = exp(s - lse) three digits at logits of 1e4.
//   token ops        {ms, log(ss + e^(s_y - ms)), log p_y, 0}
//   forward KL       {ms, log ss, mt, log st}
//   reverse KL/RKLD  {ms, log ss, mt, E_p[(s - ms) - (t - mt)]}
//   UnDIAL           {ms, log ss, mt, log st~}
constexpr int kNumStats = 4;

// The row's loss; writes the statistics its gradient pass needs. `s_label` is the
// student's (temperature-scaled) logit at the label, read by the token ops only.
template <Op op, typename T, typename Exp, typename Log, typename Log1p>
UE_HD T finalize(const RowState<T>& r, T s_label, T* stats, Exp exp_fn, Log log_fn, Log1p log1p_fn) {
  stats[0] = safe_max(r.ms);
  stats[2] = safe_max(r.mt);
  if constexpr (reads_label_logit(op)) {
    // log p_y = d - log(ss + e^d), d = s_y - ms <= 0, with ss excluding the label. Near
    // the top (p_y ~ 1) write it as -log1p(ss e^-d): 1 - p_y of a memorised token is far
    // below float32's resolution of 1 and would otherwise round to 0.
    const T d = s_label - stats[0];
    const T logp = -d < T(60) ? -log1p_fn(r.ss * exp_fn(-d)) : d - log_fn(r.ss + exp_fn(d));
    stats[1] = log_fn(r.ss + exp_fn(d));
    stats[2] = logp;
    stats[3] = T(0);
    return op == Op::kTokenLogprob ? logp : -logp;
  } else {
    const T log_ss = log_fn(r.ss);
    const T log_st = log_fn(r.st);
    stats[1] = log_ss;
    if constexpr (op == Op::kForwardKL) {
      stats[3] = log_st;
      return r.acc / r.st + (log_ss - log_st);
    } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
      const T c = r.acc / r.ss;
      stats[3] = c;
      return c + (log_st - log_ss);
    } else {  // UnDIAL
      stats[3] = log_st;
      return log_ss - r.acc / r.st;
    }
  }
}

// Gradient of the row loss w.r.t. one (temperature-scaled) student logit, away from the
// label, times g (the upstream gradient, already divided by the temperature).
//   token_logprob  -g p          cross_entropy  g p
//   forward KL     g (p - q)     UnDIAL         g (p - q~)   (t already adjusted)
//   reverse KL     g p (((s - ms) - (t - mt)) - E_p[...])    (= p (log p - log q - KL))
template <Op op, typename T, typename Exp>
UE_HD T grad_elem(T s, T t, const T* stats, T g, Exp exp_fn) {
  const T p = exp_fn((s - stats[0]) - stats[1]);
  if constexpr (op == Op::kTokenLogprob) {
    (void)t;
    return -g * p;
  } else if constexpr (op == Op::kCrossEntropy) {
    (void)t;
    return g * p;
  } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
    // Both sides computed before the select: a load under a condition stops vectorisation.
    const T d = ((s - stats[0]) - (t - stats[2])) - stats[3];
    return p == T(0) ? T(0) : g * p * d;
  } else {
    return g * (p - exp_fn((t - stats[2]) - stats[3]));
  }
}

// The token ops' gradient at the label: g (1 - p_y) computed as -expm1(log p_y) from the
// saved log p_y (s_y - lse would round to 0 for memorised tokens, where p_y ~ 1).
template <Op op, typename T, typename Expm1>
UE_HD T grad_at_label(const T* stats, T g, Expm1 expm1_fn) {
  const T one_minus_p = -expm1_fn(stats[2]);
  return op == Op::kTokenLogprob ? g * one_minus_p : -g * one_minus_p;
}

}  // namespace unlearn_ext
