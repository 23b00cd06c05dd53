// grad *= scale on the GPU with the scale read from device memory: the fused path's
// backward (the forward wrote the gradient for an upstream gradient of 1). Plain CUDA
// runtime, no torch, like row_kernels.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/row_args.h"

namespace unlearn_ext {
namespace cuda {

// data[0, n) *= *scale (float64 in device memory) in the dtype of data; every block
// returns at once when *scale == 1, so an upstream gradient of 1 costs one read of 8 bytes
// per block, and nothing is decided on the host.
cudaError_t launch_scale(void* data, DType dtype, int64_t n, const double* scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace unlearn_ext
