// Launchers of the CUDA row kernels: plain CUDA runtime, no torch, so that the torch
// binding (bindings_cuda.cpp) and the kernels (row_kernels.cu) build separately.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/row_args.h"

namespace unlearn_ext {
namespace cuda {

// The forward of a row op on `stream`: values and stats, and the gradient too when
// a.write_grad (times a.grad_scale). Arguments must have been checked (make_row_call);
// returns the launch's error (cudaErrorInvalidValue for arguments it cannot launch).
cudaError_t launch_row_forward(const RowArgs& a, cudaStream_t stream);

// The backward: the gradient of every row from its stats and upstream gradient.
cudaError_t launch_row_backward(const RowArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace unlearn_ext
