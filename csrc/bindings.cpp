// Registers the row ops as torch operators (torch.ops.unlearn_ext.*) and their CPU kernels.
// The CUDA extension (csrc/cuda) registers CUDA kernels for the same schemas; fake (meta)
// implementations live in Python (unlearn_ext/_fake_ops.py) so torch.compile can trace.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/row_kernels.h"
#include "torch_row_args.h"

namespace unlearn_ext {
namespace {

void check_cpu(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "unlearn_ext: CPU kernel called with logits on ", logits.device());
}

// Labels outside [0, V) other than ignore_index are refused: free to check on the CPU.
void check_label_range(const RowArgs& a) {
  if (a.labels == nullptr) return;
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t y = a.labels[r];
    TORCH_CHECK_VALUE(y == a.ignore_index || (y >= 0 && y < a.vocab), "unlearn_ext: label ", y, " at row ", r, " is outside [0, ", a.vocab, ") and is not ignore_index (", a.ignore_index, ")");
  }
}

// Rows per task: enough elements per task to amortise the scheduling.
int64_t grain(const RowArgs& a) {
  const int64_t g = (int64_t{1} << 15) / (a.vocab > 0 ? a.vocab : 1);
  return g > 0 ? g : 1;
}

void run_rows(const RowArgs& a, cpu::RowRangeFn fn) {
  if (a.rows == 0) return;
  at::parallel_for(0, a.rows, grain(a), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const std::string& op, const at::Tensor& logits,
                                                const c10::optional<at::Tensor>& teacher,
                                                const c10::optional<at::Tensor>& teacher2,
                                                const c10::optional<at::Tensor>& labels,
                                                int64_t ignore_index, double inv_temperature,
                                                double alpha, double gamma,
                                                const at::Tensor* grad, double grad_scale) {
  check_cpu(logits);
  RowCall call = make_row_call(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma);
  RowArgs& a = call.args;
  check_label_range(a);
  const auto opts = logits.options().dtype(compute_dtype(logits));
  at::Tensor values = new_output({a.rows}, opts);
  at::Tensor stats = new_output({a.rows, kNumStats}, opts);
  a.values = values.data_ptr();
  a.stats = stats.data_ptr();
  if (grad != nullptr) {
    a.grad = grad_view(*grad, logits);
    a.write_grad = true;
    a.grad_scale = grad_scale;
  }
  run_rows(a, cpu::kernels().forward);
  return {values, stats};
}

std::tuple<at::Tensor, at::Tensor> row_loss_forward_cpu(
    const std::string& op, const at::Tensor& logits, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher2, const c10::optional<at::Tensor>& labels,
    int64_t ignore_index, double inv_temperature, double alpha, double gamma) {
  return forward_impl(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma, nullptr, 1.0);
}

std::tuple<at::Tensor, at::Tensor> row_loss_forward_with_grad_cpu(
    const std::string& op, const at::Tensor& logits, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher2, const c10::optional<at::Tensor>& labels,
    int64_t ignore_index, double inv_temperature, double alpha, double gamma, at::Tensor grad,
    double grad_scale) {
  return forward_impl(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma, &grad, grad_scale);
}

void row_loss_backward_cpu(const std::string& op, const at::Tensor& logits,
                           const c10::optional<at::Tensor>& teacher,
                           const c10::optional<at::Tensor>& teacher2,
                           const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                           const at::Tensor& grad_rows, int64_t ignore_index,
                           double inv_temperature, double alpha, double gamma, at::Tensor grad) {
  check_cpu(logits);
  RowCall call = make_row_call(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma);
  RowArgs& a = call.args;
  check_label_range(a);
  const auto cdt = compute_dtype(logits);
  TORCH_CHECK_VALUE(stats.scalar_type() == cdt && stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == a.rows && stats.size(1) == kNumStats, "unlearn_ext: stats must be the contiguous [rows, ", kNumStats, "] tensor returned by the forward");
  TORCH_CHECK_VALUE(grad_rows.scalar_type() == cdt && grad_rows.is_contiguous() && grad_rows.numel() == a.rows, "unlearn_ext: grad_rows must be a contiguous ", cdt, " tensor with one entry per row");
  TORCH_CHECK_VALUE(stats.device() == logits.device() && grad_rows.device() == logits.device(), "unlearn_ext: stats and grad_rows must be on the device of logits");
  a.stats = const_cast<void*>(stats.data_ptr());
  a.grad_rows = grad_rows.data_ptr();
  a.grad = grad_view(grad, logits);
  run_rows(a, cpu::kernels().backward);
}

}  // namespace

TORCH_LIBRARY(unlearn_ext, m) {
  m.def("row_loss_forward(str op, Tensor logits, Tensor? teacher, Tensor? teacher2, Tensor? labels, int ignore_index, float inv_temperature, float alpha, float gamma) -> (Tensor, Tensor)");
  m.def("row_loss_forward_with_grad(str op, Tensor logits, Tensor? teacher, Tensor? teacher2, Tensor? labels, int ignore_index, float inv_temperature, float alpha, float gamma, Tensor(a!) grad, float grad_scale) -> (Tensor, Tensor)");
  m.def("row_loss_backward(str op, Tensor logits, Tensor? teacher, Tensor? teacher2, Tensor? labels, Tensor stats, Tensor grad_rows, int ignore_index, float inv_temperature, float alpha, float gamma, Tensor(a!) grad) -> ()");
}

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("row_loss_forward", &row_loss_forward_cpu);
  m.impl("row_loss_forward_with_grad", &row_loss_forward_with_grad_cpu);
  m.impl("row_loss_backward", &row_loss_backward_cpu);
}

}  // namespace unlearn_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unlearn_ext CPU kernels (the ops are registered under torch.ops.unlearn_ext)";
  m.def("cpu_isa", [] { return std::string(unlearn_ext::cpu::kernels().isa); },
        "The instruction set of the CPU kernels in use (avx512, avx2 or base).");
}
