// The scale kernel of scale_kernel.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scale_kernel.h"

namespace unlearn_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// x * s rounded once to T: in float for 16/32-bit types, in double for float64. The 16-bit
// types convert through their intrinsics: torch builds CUDA code with
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ float scaled(float x, double s) { return x * static_cast<float>(s); }
__device__ double scaled(double x, double s) { return x * s; }
__device__ __nv_bfloat16 scaled(__nv_bfloat16 x, double s) {
  return __float2bfloat16_rn(__bfloat162float(x) * static_cast<float>(s));
}
__device__ __half scaled(__half x, double s) { return __float2half_rn(__half2float(x) * static_cast<float>(s)); }

template <typename T>
__global__ void scale_kernel(T* data, int64_t n, const double* scale) {
  const double s = *scale;
  if (s == 1.0) return;  // the upstream gradient is 1: the forward's gradient stands
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    data[i] = scaled(data[i], s);
}

template <typename T>
cudaError_t run(void* data, int64_t n, const double* scale, cudaStream_t stream) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  scale_kernel<T><<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream>>>(
      static_cast<T*>(data), n, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scale(void* data, DType dtype, int64_t n, const double* scale, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return run<float>(data, n, scale, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(data, n, scale, stream);
    case DType::kFloat16: return run<__half>(data, n, scale, stream);
    case DType::kFloat64: return run<double>(data, n, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace unlearn_ext
