// Registers the CUDA kernels of the row ops for the schemas that unlearn_ext._C defines
// (csrc/bindings.cpp): import unlearn_ext._C first. The kernels themselves
// (row_kernels.cu) see no torch header; this file checks the tensors with the same code
// as the CPU binding (torch_row_args.h), allocates the outputs, and launches on the
// current stream of the logits' device.
//
// Labels are not range-checked here (that would copy them to the host): the Python layer
// checks them, and a kernel that meets a needed label outside [0, V) writes NaN for its row.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/row_kernels.h"
#include "torch_row_args.h"

namespace unlearn_ext {
namespace {

void check_cuda(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "unlearn_ext: CUDA kernel called with logits on ", logits.device());
}

void launch(cudaError_t (*launcher)(const RowArgs&, cudaStream_t), const RowArgs& a) {
  C10_CUDA_CHECK(launcher(a, c10::cuda::getCurrentCUDAStream().stream()));
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const std::string& op, const at::Tensor& logits,
                                                const c10::optional<at::Tensor>& teacher,
                                                const c10::optional<at::Tensor>& teacher2,
                                                const c10::optional<at::Tensor>& labels,
                                                int64_t ignore_index, double inv_temperature,
                                                double alpha, double gamma,
                                                const at::Tensor* grad, double grad_scale) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  RowCall call = make_row_call(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma);
  auto outputs = attach_forward_outputs(call.args, logits, grad, grad_scale);
  launch(&cuda::launch_row_forward, call.args);
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> row_loss_forward_cuda(
    const std::string& op, const at::Tensor& logits, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher2, const c10::optional<at::Tensor>& labels,
    int64_t ignore_index, double inv_temperature, double alpha, double gamma) {
  return forward_impl(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma, nullptr, 1.0);
}

std::tuple<at::Tensor, at::Tensor> row_loss_forward_with_grad_cuda(
    const std::string& op, const at::Tensor& logits, const c10::optional<at::Tensor>& teacher,
    const c10::optional<at::Tensor>& teacher2, const c10::optional<at::Tensor>& labels,
    int64_t ignore_index, double inv_temperature, double alpha, double gamma, at::Tensor grad,
    double grad_scale) {
  return forward_impl(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma, &grad, grad_scale);
}

void row_loss_backward_cuda(const std::string& op, const at::Tensor& logits,
                            const c10::optional<at::Tensor>& teacher,
                            const c10::optional<at::Tensor>& teacher2,
                            const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                            const at::Tensor& grad_rows, int64_t ignore_index,
                            double inv_temperature, double alpha, double gamma, at::Tensor grad) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  RowCall call = make_row_call(op, logits, teacher, teacher2, labels, ignore_index, inv_temperature, alpha, gamma);
  attach_backward_args(call.args, logits, stats, grad_rows, grad);
  launch(&cuda::launch_row_backward, call.args);
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("row_loss_forward", &row_loss_forward_cuda);
  m.impl("row_loss_forward_with_grad", &row_loss_forward_with_grad_cuda);
  m.impl("row_loss_backward", &row_loss_backward_cuda);
}

}  // namespace unlearn_ext

// An importable module with nothing in it: importing it runs the registration above.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                               "unlearn_ext CUDA kernels (registered under torch.ops.unlearn_ext)", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
