// The arguments of one row-op launch as plain data (no torch headers), so that the CPU
// kernels built for several instruction sets and the CUDA kernels built by nvcc alone can
// share them with the torch bindings.
#pragma once

#include <cstdint>

#include "row_math.h"

namespace unlearn_ext {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// A [N, V] view of a 2-D or 3-D tensor with unit stride on V. Row r of a [B, T, V]
// tensor starts at (r / T) * outer_stride + (r % T) * inner_stride, so that shifted
// causal-LM logits (logits[:, :-1]) are read in place, without a copy.
struct RowView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t inner_rows = 1;    // T (rows per outer index); N for a 2-D tensor
  int64_t inner_stride = 0;  // elements between consecutive rows
  int64_t outer_stride = 0;  // elements between consecutive outer indices
};

// Row r of the view is row (r % inner_rows) of outer index r / inner_rows. Views of the
// same launch share inner_rows (their shapes are equal), so kernels split r once.
UE_HD int64_t row_offset(const RowView& v, int64_t outer, int64_t inner) {
  return outer * v.outer_stride + inner * v.inner_stride;
}
UE_HD int64_t row_offset(const RowView& v, int64_t r) {
  return row_offset(v, r / v.inner_rows, r % v.inner_rows);
}

struct RowArgs {
  Op op = Op::kCrossEntropy;
  int64_t rows = 0;
  int64_t vocab = 0;
  RowView student, teacher, teacher2;  // teachers unused by ops that have none
  const int64_t* labels = nullptr;     // [rows] or null (no label: no row is ignored)
  int64_t ignore_index = -100;
  // The scalar parameters, in the order of the schemas' `float[] params` (set_params).
  double inv_temperature = 1.0;
  double alpha = 0.0;             // RKLD
  double gamma = 0.0;             // UnDIAL
  double label_smoothing = 0.0;   // cross_entropy, in [0, 1]
  double lse_square_scale = 0.0;  // cross_entropy's z-loss weight, >= 0
  double softcap = 0.0;           // student logits c tanh(z / c) when > 0
  double beta = 0.5;              // JSD, in (0, 1)

  // Outputs and per-row buffers, in the compute type (float64 inputs: double; else float).
  void* values = nullptr;           // [rows]
  void* stats = nullptr;            // [rows, kNumStats]
  const void* grad_rows = nullptr;  // backward: upstream gradient per row
  RowView grad;                     // gradient out (same dtype as the student); may alias it
  bool write_grad = false;          // forward: also write the gradient (fused path)
  double grad_scale = 1.0;          // fused path: upstream gradient of every row, on the host
  const double* grad_scale_device = nullptr;  // ... or in device memory (GPUs: no host sync)
};

// The schemas' `float[] params` (unlearn_ext/ops/_row_loss.py, RowParams.scalars): one
// list, so that a new parameter changes this function and RowParams, not every signature.
constexpr int kNumParams = 7;
inline void set_params(RowArgs& a, const double* p) {
  a.inv_temperature = p[0];
  a.alpha = p[1];
  a.gamma = p[2];
  a.label_smoothing = p[3];
  a.lse_square_scale = p[4];
  a.softcap = p[5];
  a.beta = p[6];
}

template <typename T>
UE_HD RowConsts<T> consts_of(const RowArgs& a) {
  RowConsts<T> c;
  c.inv_temperature = static_cast<T>(a.inv_temperature);
  c.alpha = static_cast<T>(a.alpha);
  c.gamma = static_cast<T>(a.gamma);
  c.softcap = static_cast<T>(a.softcap);
  c.inv_softcap = a.softcap > 0 ? static_cast<T>(1.0 / a.softcap) : T(0);
  c.smoothing = static_cast<T>(a.label_smoothing);
  c.smoothing_per_elem = static_cast<T>(a.label_smoothing / static_cast<double>(a.vocab > 0 ? a.vocab : 1));
  c.z_scale = static_cast<T>(a.lse_square_scale);
  c.beta = static_cast<T>(a.beta);
  c.one_minus_beta = static_cast<T>(1.0 - a.beta);
  return c;
}

// The fused path's upstream gradient, read where the binding left it.
UE_HD double fused_grad_scale(const RowArgs& a) {
  return a.grad_scale_device != nullptr ? *a.grad_scale_device : a.grad_scale;
}

// True when row r is skipped: loss 0, gradient exactly 0.
UE_HD bool row_ignored(const RowArgs& a, int64_t r) {
  return a.labels != nullptr && a.labels[r] == a.ignore_index;
}

// The row's label, or -1 when the row has none or it is outside [0, V) (the bindings
// reject such labels before launching; a kernel that meets one writes NaN, never reads
// out of bounds).
UE_HD int64_t row_label(const RowArgs& a, int64_t r) {
  if (a.labels == nullptr) return -1;
  const int64_t y = a.labels[r];
  return (y >= 0 && y < a.vocab) ? y : -1;
}

}  // namespace unlearn_ext
