// Checks the tensors of a row-op call and describes them as RowArgs. Shared by the CPU
// and CUDA bindings, so both refuse the same bad input before any kernel touches memory.
// The Python layer (unlearn_ext/ops/_checks.py) raises friendlier ValueErrors first; these
// checks guard direct calls of torch.ops.unlearn_ext.*.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/row_args.h"

namespace unlearn_ext {

inline Op parse_op(const std::string& name) {
  for (int i = 0; i < kNumOps; ++i)
    if (name == kOpNames[i]) return static_cast<Op>(i);
  TORCH_CHECK_VALUE(false, "unlearn_ext: unknown row op '", name, "'");
}

inline DType to_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "unlearn_ext: ", arg, " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  }
}

// A 2-D [N, V] or 3-D [B, T, V] tensor with unit stride on V.
inline RowView to_row_view(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, "unlearn_ext: ", arg, " must be 2-D or 3-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "unlearn_ext: ", arg, " must have unit stride on its last dimension");
  RowView v;
  v.data = t.data_ptr();
  v.dtype = to_dtype(t, arg);
  if (t.dim() == 2) {
    v.inner_rows = t.size(0) > 0 ? t.size(0) : 1;
    v.inner_stride = t.stride(0);
    v.outer_stride = 0;
  } else {
    v.inner_rows = t.size(1) > 0 ? t.size(1) : 1;
    v.inner_stride = t.stride(1);
    v.outer_stride = t.stride(0);
  }
  return v;
}

// The scalar parameters (RowArgs, set_params), each in its range; NaN fails every check.
inline void check_params(Op op, c10::ArrayRef<double> p) {
  TORCH_CHECK_VALUE(p.size() == static_cast<size_t>(kNumParams), "unlearn_ext: params must hold ", kNumParams, " numbers (inv_temperature, alpha, gamma, label_smoothing, lse_square_scale, softcap, beta), got ", p.size());
  TORCH_CHECK_VALUE(std::isfinite(p[0]) && p[0] > 0, "unlearn_ext: temperature must be positive and finite");
  TORCH_CHECK_VALUE(std::isfinite(p[1]) && std::isfinite(p[2]), "unlearn_ext: alpha and gamma must be finite, got alpha=", p[1], ", gamma=", p[2]);
  TORCH_CHECK_VALUE(p[3] >= 0 && p[3] <= 1, "unlearn_ext: label_smoothing must be in [0, 1], got ", p[3]);
  TORCH_CHECK_VALUE(std::isfinite(p[4]) && p[4] >= 0, "unlearn_ext: lse_square_scale must be finite and >= 0, got ", p[4]);
  TORCH_CHECK_VALUE(std::isfinite(p[5]) && p[5] >= 0, "unlearn_ext: softcap must be positive and finite (0: none), got ", p[5]);
  TORCH_CHECK_VALUE(op != Op::kJSD || (p[6] > 0 && p[6] < 1), "unlearn_ext: beta of jsd must be in (0, 1) (0 is forward_kl, 1 reverse_kl), got ", p[6]);
}

struct RowCall {
  RowArgs args;
  at::Tensor labels;  // kept alive while args points into it
};

// Validates every input of a call and fills RowArgs (outputs are attached by the caller).
inline RowCall make_row_call(const std::string& op_name, const at::Tensor& logits,
                             const c10::optional<at::Tensor>& teacher,
                             const c10::optional<at::Tensor>& teacher2,
                             const c10::optional<at::Tensor>& labels, int64_t ignore_index,
                             c10::ArrayRef<double> params) {
  RowCall call;
  RowArgs& a = call.args;
  a.op = parse_op(op_name);
  a.student = to_row_view(logits, "logits");
  a.vocab = logits.size(-1);
  a.rows = a.vocab > 0 ? logits.numel() / a.vocab : 0;
  TORCH_CHECK_VALUE(a.vocab > 0, "unlearn_ext: logits must have a non-empty vocabulary dimension");
  a.ignore_index = ignore_index;
  check_params(a.op, params);
  set_params(a, params.data());

  const int needed = num_teachers(a.op);
  const c10::optional<at::Tensor>* teachers[2] = {&teacher, &teacher2};
  const char* names[2] = {"teacher", "teacher2"};
  RowView* views[2] = {&a.teacher, &a.teacher2};
  for (int k = 0; k < 2; ++k) {
    const bool given = teachers[k]->has_value() && teachers[k]->value().defined();
    TORCH_CHECK_VALUE(given == (k < needed), "unlearn_ext: op '", op_name, "' takes ", needed, " teacher tensor(s); ", names[k], given ? " was given" : " is missing");
    if (!given) continue;
    const at::Tensor& t = teachers[k]->value();
    TORCH_CHECK_VALUE(t.sizes() == logits.sizes(), "unlearn_ext: ", names[k], " must have the shape of logits ", logits.sizes(), ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == logits.device(), "unlearn_ext: ", names[k], " is on ", t.device(), " but logits are on ", logits.device());
    *views[k] = to_row_view(t, names[k]);
  }

  const bool has_labels = labels.has_value() && labels->defined();
  TORCH_CHECK_VALUE(has_labels || !needs_label(a.op), "unlearn_ext: op '", op_name, "' needs labels");
  if (has_labels) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "unlearn_ext: labels must be int64, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.numel() == a.rows, "unlearn_ext: labels must have one entry per row of logits (", a.rows, "), got ", l.numel());
    TORCH_CHECK_VALUE(l.device() == logits.device(), "unlearn_ext: labels are on ", l.device(), " but logits are on ", logits.device());
    call.labels = l.contiguous();
    a.labels = call.labels.data_ptr<int64_t>();
  }
  return call;
}

// A kernel output buffer. Under UNLEARN_EXT_POISON=1 (the tests) it starts as NaN, so an
// element that a kernel forgets to write cannot pass for a result.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const char* poison = std::getenv("UNLEARN_EXT_POISON");
  if (poison != nullptr && poison[0] == '1') return at::full(sizes, NAN, opts);
  return at::empty(sizes, opts);
}

// The dtype of per-row outputs: float64 for float64 logits, float32 otherwise.
inline at::ScalarType compute_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// True when no two rows of a tensor with unit stride on its last dimension share memory:
// taken by increasing stride, each dimension's stride must clear the extent of the ones
// inside it. (Sufficient, and exact for every layout slicing and expanding produce.)
inline bool rows_disjoint(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the row dimensions
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = t.size(-1);
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return false;
    extent += stride * (size - 1);
  }
  return true;
}

// Checks a gradient buffer (fresh, or the logits themselves when written in place). Its
// rows must not overlap: an expanded tensor would have one row written by several threads.
inline RowView grad_view(const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), "unlearn_ext: grad must have the shape of logits");
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), "unlearn_ext: grad must have the dtype of logits");
  TORCH_CHECK_VALUE(grad.device() == logits.device(), "unlearn_ext: grad must be on the device of logits");
  RowView v = to_row_view(grad, "grad");
  TORCH_CHECK_VALUE(grad.numel() == 0 || rows_disjoint(grad), "unlearn_ext: grad has rows that share memory (an expanded or overlapping tensor, strides ", grad.strides(), "); each row needs its own memory");
  return v;
}

// The fused path's grad_scale: one element on the device of the logits, as float64 (a
// float64 gradient needs it; a GPU kernel reads it from device memory, no host sync).
inline at::Tensor check_grad_scale(const at::Tensor& grad_scale, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(grad_scale.numel() == 1, "unlearn_ext: grad_scale must have one element, got ", grad_scale.numel());
  TORCH_CHECK_VALUE(grad_scale.device() == logits.device(), "unlearn_ext: grad_scale is on ", grad_scale.device(), " but logits are on ", logits.device());
  TORCH_CHECK_TYPE(grad_scale.is_floating_point(), "unlearn_ext: grad_scale must be a floating-point tensor, got ", grad_scale.scalar_type());
  return grad_scale.to(at::kDouble).contiguous();
}

// Allocates a forward's outputs (values, stats) and points the call at them; with a
// gradient buffer (the fused path) the kernel also writes the gradient, times grad_scale
// (already in a.grad_scale or a.grad_scale_device: the backend's Guard put it there).
inline std::tuple<at::Tensor, at::Tensor> attach_forward_outputs(RowArgs& a, const at::Tensor& logits,
                                                                 const at::Tensor* grad) {
  const auto opts = logits.options().dtype(compute_dtype(logits));
  at::Tensor values = new_output({a.rows}, opts);
  at::Tensor stats = new_output({a.rows, kNumStats}, opts);
  a.values = values.data_ptr();
  a.stats = stats.data_ptr();
  if (grad != nullptr) {
    a.grad = grad_view(*grad, logits);
    a.write_grad = true;
  }
  return {values, stats};
}

// Checks a backward's inputs (the forward's stats, the per-row upstream gradient) and
// points the call at them and at the gradient buffer.
inline void attach_backward_args(RowArgs& a, const at::Tensor& logits, const at::Tensor& stats,
                                 const at::Tensor& grad_rows, const at::Tensor& grad) {
  const auto cdt = compute_dtype(logits);
  TORCH_CHECK_VALUE(stats.scalar_type() == cdt && stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == a.rows && stats.size(1) == kNumStats, "unlearn_ext: stats must be the contiguous [rows, ", kNumStats, "] tensor returned by the forward");
  TORCH_CHECK_VALUE(grad_rows.scalar_type() == cdt && grad_rows.is_contiguous() && grad_rows.numel() == a.rows, "unlearn_ext: grad_rows must be a contiguous ", cdt, " tensor with one entry per row");
  TORCH_CHECK_VALUE(stats.device() == logits.device() && grad_rows.device() == logits.device(), "unlearn_ext: stats and grad_rows must be on the device of logits");
  a.stats = const_cast<void*>(stats.data_ptr());
  a.grad_rows = grad_rows.data_ptr();
  a.grad = grad_view(grad, logits);
}

// The three ops of the schemas (csrc/bindings.cpp) for one backend: check, allocate,
// describe, run. The backend supplies
//   Guard      constructed from the logits before anything else: checks their device and
//              holds whatever the kernels need (the CUDA binding: a device guard);
//   forward(a), backward(a)   which run its kernels on a checked RowArgs;
//   set_grad_scale(a, s)      points a at the fused path's grad_scale s (a checked float64
//                             tensor of one element on the device): the CPU reads it, a
//                             GPU kernel reads it from device memory.
template <class Backend>
struct RowOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const std::string& op, const at::Tensor& logits,
                                                    const c10::optional<at::Tensor>& teacher,
                                                    const c10::optional<at::Tensor>& teacher2,
                                                    const c10::optional<at::Tensor>& labels, int64_t ignore_index,
                                                    c10::ArrayRef<double> params) {
    return run_forward(op, logits, teacher, teacher2, labels, ignore_index, params, nullptr, nullptr);
  }

  static std::tuple<at::Tensor, at::Tensor> forward_with_grad(
      const std::string& op, const at::Tensor& logits, const c10::optional<at::Tensor>& teacher,
      const c10::optional<at::Tensor>& teacher2, const c10::optional<at::Tensor>& labels, int64_t ignore_index,
      c10::ArrayRef<double> params, at::Tensor grad, const at::Tensor& grad_scale) {
    return run_forward(op, logits, teacher, teacher2, labels, ignore_index, params, &grad, &grad_scale);
  }

  static void backward(const std::string& op, const at::Tensor& logits, const c10::optional<at::Tensor>& teacher,
                       const c10::optional<at::Tensor>& teacher2, const c10::optional<at::Tensor>& labels,
                       const at::Tensor& stats, const at::Tensor& grad_rows, int64_t ignore_index,
                       c10::ArrayRef<double> params, at::Tensor grad) {
    const typename Backend::Guard guard(logits);
    RowCall call = make_row_call(op, logits, teacher, teacher2, labels, ignore_index, params);
    attach_backward_args(call.args, logits, stats, grad_rows, grad);
    Backend::backward(call.args);
  }

 private:
  static std::tuple<at::Tensor, at::Tensor> run_forward(const std::string& op, const at::Tensor& logits,
                                                        const c10::optional<at::Tensor>& teacher,
                                                        const c10::optional<at::Tensor>& teacher2,
                                                        const c10::optional<at::Tensor>& labels,
                                                        int64_t ignore_index, c10::ArrayRef<double> params,
                                                        const at::Tensor* grad, const at::Tensor* grad_scale) {
    const typename Backend::Guard guard(logits);
    RowCall call = make_row_call(op, logits, teacher, teacher2, labels, ignore_index, params);
    at::Tensor scale;  // kept alive while the kernels may read it
    if (grad_scale != nullptr) {
      scale = check_grad_scale(*grad_scale, logits);
      Backend::set_grad_scale(call.args, scale);
    }
    auto outputs = attach_forward_outputs(call.args, logits, grad);
    Backend::forward(call.args);
    return outputs;
  }
};

}  // namespace unlearn_ext
