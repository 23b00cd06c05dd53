// Row kernels for x86-64 processors with AVX2, FMA and F16C.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define UE_ISA avx2
#include "row_kernels_impl.h"
#endif
