// Registers the CUDA kernels of the row ops for the schemas that unlearn_ext._C defines
// (csrc/bindings.cpp): import unlearn_ext._C first. The kernels themselves
// (row_kernels.cu) see no torch header; the checks, outputs and RowArgs come from the
// code the CPU binding uses too (RowOps in torch_row_args.h).
//
// Labels are not range-checked here (that would copy them to the host): the Python layer
// checks them on the device (torch._assert_async), and a kernel that meets a needed label
// outside [0, V) writes NaN for its row.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/row_kernels.h"
#include "cuda/scale_kernel.h"
#include "torch_row_args.h"

namespace unlearn_ext {
namespace {

void launch(cudaError_t (*launcher)(const RowArgs&, cudaStream_t), const RowArgs& a) {
  C10_CUDA_CHECK(launcher(a, c10::cuda::getCurrentCUDAStream().stream()));
}

// The CUDA backend of RowOps (torch_row_args.h): kernels on the current stream of the
// logits' device.
struct Cuda {
  struct Guard {
    explicit Guard(const at::Tensor& logits) : device(check(logits)) {}
    static c10::Device check(const at::Tensor& logits) {
      TORCH_CHECK_VALUE(logits.is_cuda(), "unlearn_ext: CUDA kernel called with logits on ", logits.device());
      return logits.device();
    }
    const c10::cuda::CUDAGuard device;
  };
  static void forward(const RowArgs& a) { launch(&cuda::launch_row_forward, a); }
  static void backward(const RowArgs& a) { launch(&cuda::launch_row_backward, a); }
  // The kernel reads the scale from device memory: no copy to the host.
  static void set_grad_scale(RowArgs& a, const at::Tensor& scale) { a.grad_scale_device = scale.data_ptr<double>(); }
};

// grad *= scale with the scale read on the device (a no-op kernel when it is 1).
void scale_grad(at::Tensor grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(grad.is_cuda() && scale.numel() == 1 && scale.device() == grad.device(), "unlearn_ext: scale must be one element on the device of grad");
  const c10::cuda::CUDAGuard device(grad.device());
  const at::Tensor s = scale.to(at::kDouble).contiguous();
  if (!grad.is_contiguous()) {  // not a buffer of ours: no skip, still no host sync
    grad.mul_(s);
    return;
  }
  C10_CUDA_CHECK(cuda::launch_scale(grad.data_ptr(), to_dtype(grad, "grad"), grad.numel(), s.data_ptr<double>(),
                                    c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("row_loss_forward", &RowOps<Cuda>::forward);
  m.impl("row_loss_forward_with_grad", &RowOps<Cuda>::forward_with_grad);
  m.impl("row_loss_backward", &RowOps<Cuda>::backward);
  m.impl("scale_grad", &scale_grad);
}

}  // namespace unlearn_ext

// An importable module with nothing in it: importing it runs the registration above.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                               "unlearn_ext CUDA kernels (registered under torch.ops.unlearn_ext)", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
