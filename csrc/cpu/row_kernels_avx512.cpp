// Row kernels for x86-64 processors with AVX-512 (F, BW, VL, DQ).
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define UE_ISA avx512
#include "row_kernels_impl.h"
#endif
