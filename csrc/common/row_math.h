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
  kJSD = 6,           // generalised JSD, 0 < beta < 1, scaled to be continuous at 0 and 1
};

constexpr int kNumOps = 7;
constexpr const char* kOpNames[kNumOps] = {"token_logprob", "cross_entropy", "forward_kl", "reverse_kl",
                                           "rkld",          "undial",        "jsd"};

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

// The scalar parameters of a launch in the compute type (row_args.h, consts_of).
template <typename T>
struct RowConsts {
  T inv_temperature, alpha, gamma;  // alpha: RKLD, gamma: UnDIAL
  T softcap, inv_softcap;           // Gemma-2 softcap c of the student's logits; 0: none
  T smoothing, smoothing_per_elem;  // cross_entropy's label smoothing eps, and eps / V
  T z_scale;                        // cross_entropy's z-loss weight (lse_square_scale)
  T beta, one_minus_beta;           // JSD's beta, 0 < beta < 1, and 1 - beta (exact in double)
};

// The student's logit as the loss sees it: softcapped, c tanh(z / c), when c > 0, then
// divided by the temperature. dcap = d capped / dz = 1 - tanh^2, the factor that the
// gradient w.r.t. the raw logit carries (exactly 1 without a softcap). A masked logit
// (-inf) stays masked: capping it to -c would give masked tokens probability.
template <typename T, typename Tanh>
UE_HD T student_logit(T z, const RowConsts<T>& c, T& dcap, Tanh tanh_fn) {
  if (c.softcap == T(0)) {
    dcap = T(1);
    return z * c.inv_temperature;
  }
  const T th = tanh_fn(z * c.inv_softcap);
  const bool masked = z == neg_inf<T>();
  dcap = masked ? T(1) : T(1) - th * th;  // a masked logit passes through unchanged
  return masked ? z : c.softcap * th * c.inv_temperature;
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
//     cross_entropy  sum (s - ms), with st counting the elements (label smoothing's mean)
//     JSD         unused: its sums need both log-sums and take a second pass (jsd_terms)
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
  } else if constexpr (op == Op::kCrossEntropy) {
    (void)t; (void)es; (void)et; (void)mt0;
    return s - ms0;  // label smoothing's sum of the logits (-inf: the row's smoothing term is inf)
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
  } else if constexpr (op == Op::kCrossEntropy) {
    r.acc = r.acc + ds * r.st;  // st counts the elements (mt stays -inf: ft = 1)
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
//   token ops        {ms, log(ss + e^(s_y - ms)), log p_y, 0, 0}
//   forward KL       {ms, log ss, mt, log st, 0}
//   reverse KL/RKLD  {ms, log ss, mt, E_p[(s - ms) - (t - mt)], 0}
//   UnDIAL           {ms, log ss, mt, log st~, 0}
//   JSD              {ms, log ss, mt, log st, E_p[b]}   (b: see jsd_terms)
constexpr int kNumStats = 5;

// The row's loss; writes the statistics its gradient pass needs. `s_label` is the
// student's (temperature-scaled) logit at the label, read by the token ops only. JSD's
// loss and last statistic come from its second pass (jsd_finish); here it returns 0.
template <Op op, typename T, typename Exp, typename Log, typename Log1p>
UE_HD T finalize(const RowState<T>& r, T s_label, T* stats, const RowConsts<T>& c, Exp exp_fn, Log log_fn,
                 Log1p log1p_fn) {
  stats[0] = safe_max(r.ms);
  stats[2] = safe_max(r.mt);
  stats[4] = T(0);
  if constexpr (reads_label_logit(op)) {
    // log p_y = d - log(ss + e^d), d = s_y - ms <= 0, with ss excluding the label. Near
    // the top (p_y ~ 1) write it as -log1p(ss e^-d): 1 - p_y of a memorised token is far
    // below float32's resolution of 1 and would otherwise round to 0.
    const T d = s_label - stats[0];
    const T logp = -d < T(60) ? -log1p_fn(r.ss * exp_fn(-d)) : d - log_fn(r.ss + exp_fn(d));
    stats[1] = log_fn(r.ss + exp_fn(d));
    stats[2] = logp;
    stats[3] = T(0);
    if constexpr (op == Op::kTokenLogprob) {
      (void)c;
      return logp;
    } else {
      // Label smoothing (PyTorch's): (1 - eps) CE + eps mean_v(-log p_v), where
      // mean_v(-log p_v) = log sum e^(s - ms) - mean_v(s - ms); z-loss: + scale lse^2.
      // Each only when asked for: 0 * inf would turn a masked row's loss into NaN.
      T value = -logp;
      if (c.smoothing != T(0)) value = (T(1) - c.smoothing) * value + c.smoothing * (stats[1] - r.acc / r.st);
      if (c.z_scale != T(0)) {
        const T lse = stats[0] + stats[1];
        value += c.z_scale * lse * lse;
      }
      return value;
    }
  } else {
    (void)c;
    const T log_ss = log_fn(r.ss);
    const T log_st = log_fn(r.st);
    stats[1] = log_ss;
    if constexpr (op == Op::kForwardKL || op == Op::kJSD) {
      stats[3] = log_st;
      return op == Op::kJSD ? T(0) : r.acc / r.st + (log_ss - log_st);
    } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
      const T c3 = r.acc / r.ss;
      stats[3] = c3;
      return c3 + (log_st - log_ss);
    } else {  // UnDIAL
      stats[3] = log_st;
      return log_ss - r.acc / r.st;
    }
  }
}

// ---- the generalised Jensen-Shannon divergence ------------------------------------------
// With m = beta q + (1 - beta) p (q the teacher's distribution, p the student's), the
// loss is
//     JSD_beta = [beta KL(q || m) + (1 - beta) KL(p || m)] / (beta (1 - beta)),
// the divergence of Liger and TRL divided by beta (1 - beta): as beta -> 0 it tends to
// KL(q || p) (forward_kl), as beta -> 1 to KL(p || q) (reverse_kl), so the family is
// continuous at both ends (the unscaled one tends to 0 there). Per element, with
// d = log q - log p and b = log(p / m) / beta,
//     value_v = q log(q / m) / (1 - beta) + p b,     d loss / d s_v = p (b - E_p[b]).
// log(m / p) = log((1 - beta) + beta e^d) and log(m / q) = log(beta + (1 - beta) e^-d)
// are taken by log_mix, accurate relative to their own size, so that dividing by a beta
// (or 1 - beta) of 1e-6 loses nothing: the direct log p - log m would cancel to noise.

// log((1 - g) + g e^x) for 0 < g < 1 (gc = 1 - g): log1p(g expm1(x)) where
// 1 + g expm1(x) >= 1/2, else (x < 0, g > 1/2) x + log1p(gc expm1(-x)), whose argument is
// positive; beyond |x| = 80 (expm1 would overflow) from the sum itself. m supplies exp,
// log, log1p and expm1. x = -inf gives log gc, x = +inf gives +inf, NaN stays NaN.
template <typename T, typename M>
UE_HD T log_mix(T x, T g, T gc, M m) {
  if (x > T(80)) return x + m.log(g + gc * m.exp(-x));
  const T y = g * m.expm1(x);
  if (y >= T(-0.5)) return m.log1p(y);
  if (x < T(-80)) return m.log(gc + g * m.exp(x));
  return x + m.log1p(gc * m.expm1(-x));
}

// One element's share of the JSD (value) and of E_p[b] (pb = p b), from the statistics
// {ms, log ss, mt, log st} of pass 1. Zero probabilities contribute exactly 0 (p = q = 0
// would give d = NaN).
template <typename T, typename M>
UE_HD void jsd_terms(T s, T t, const T* stats, const RowConsts<T>& c, M m, T& value, T& pb) {
  const T lp = (s - stats[0]) - stats[1];
  const T lq = (t - stats[2]) - stats[3];
  const T p = m.exp(lp), q = m.exp(lq);
  const T d = lq - lp;
  const T b = -log_mix(d, c.beta, c.one_minus_beta, m) / c.beta;
  pb = p == T(0) ? T(0) : p * b;
  const T vq = q == T(0) ? T(0) : -q * log_mix(-d, c.one_minus_beta, c.beta, m) / c.one_minus_beta;
  value = vq + pb;
}

// The row's JSD once pass 2 has summed jsd_terms: stores E_p[b], returns the loss.
template <typename T>
UE_HD T jsd_finish(T value_sum, T pb_sum, T* stats) {
  stats[4] = pb_sum;
  return value_sum;
}

// Gradient of the row loss w.r.t. one (temperature-scaled) student logit, away from the
// label, times g (the upstream gradient, already divided by the temperature).
//   token_logprob  -g p          cross_entropy  g (p (1 + 2 z lse) - eps / V)
//   forward KL     g (p - q)     UnDIAL         g (p - q~)   (t already adjusted)
//   reverse KL     g p (((s - ms) - (t - mt)) - E_p[...])    (= p (log p - log q - KL))
//   JSD            g p (b - E_p[b])
// m supplies exp (per element), log, log1p and expm1. grad_elem_p takes the student's
// probability p = exp((s - stats[0]) - stats[1]) from the caller (the CPU's fused forward
// keeps each element's exponential from pass 1; forward KL and UnDIAL then need no s).
template <Op op, typename T, typename M>
UE_HD T grad_elem_p(T p, T s, T t, const T* stats, T g, const RowConsts<T>& c, M m) {
  if constexpr (op == Op::kTokenLogprob) {
    (void)s; (void)t; (void)c;
    return -g * p;
  } else if constexpr (op == Op::kCrossEntropy) {
    (void)s; (void)t;
    const T zf = c.z_scale == T(0) ? T(1) : T(1) + T(2) * c.z_scale * (stats[0] + stats[1]);
    return g * (p * zf - c.smoothing_per_elem);
  } else if constexpr (op == Op::kReverseKL || op == Op::kRKLD) {
    (void)c;
    // Both sides computed before the select: a load under a condition stops vectorisation.
    const T d = ((s - stats[0]) - (t - stats[2])) - stats[3];
    return p == T(0) ? T(0) : g * p * d;
  } else if constexpr (op == Op::kJSD) {
    const T d = ((t - stats[2]) - stats[3]) - ((s - stats[0]) - stats[1]);
    const T b = -log_mix(d, c.beta, c.one_minus_beta, m) / c.beta;
    return p == T(0) ? T(0) : g * p * (b - stats[4]);
  } else {
    (void)c; (void)s;
    return g * (p - m.exp((t - stats[2]) - stats[3]));
  }
}

template <Op op, typename T, typename M>
UE_HD T grad_elem(T s, T t, const T* stats, T g, const RowConsts<T>& c, M m) {
  return grad_elem_p<op, T>(m.exp((s - stats[0]) - stats[1]), s, t, stats, g, c, m);
}

// The token ops' gradient at the label: g (1 - p_y) computed as -expm1(log p_y) from the
// saved log p_y (s_y - lse would round to 0 for memorised tokens, where p_y ~ 1); for
// cross_entropy with label smoothing eps and z-loss z,
// g (-(1 - p_y) + eps (1 - 1/V) + 2 z lse p_y).
template <Op op, typename T, typename M>
UE_HD T grad_at_label(const T* stats, T g, const RowConsts<T>& c, M m) {
  const T one_minus_p = -m.expm1(stats[2]);
  if constexpr (op == Op::kTokenLogprob) {
    (void)c;
    return g * one_minus_p;
  } else {
    const T z = c.z_scale == T(0) ? T(0) : T(2) * c.z_scale * (stats[0] + stats[1]) * m.exp(stats[2]);
    return g * ((-one_minus_p + (c.smoothing - c.smoothing_per_elem)) + z);
  }
}

}  // namespace unlearn_ext
