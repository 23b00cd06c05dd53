// Entry points of the CPU row kernels. They are compiled for several instruction sets
// (row_kernels_<isa>.cpp); kernels() picks the widest one the processor supports.
#pragma once

#include <cstdint>

#include "../common/row_args.h"

namespace unlearn_ext {
namespace cpu {

// Runs rows [begin, end) of a launch; the caller splits rows across threads.
using RowRangeFn = void (*)(const RowArgs&, int64_t, int64_t);

struct Kernels {
  const char* isa;
  RowRangeFn forward;
  RowRangeFn backward;
};

// The kernels for this processor: AVX-512, AVX2 or the baseline build, or the one named by
// the environment variable UNLEARN_EXT_CPU_ISA (avx512, avx2, base) when it can run here.
const Kernels& kernels();

#define UE_DECLARE_ISA(ISA)                                  \
  namespace ISA {                                            \
  void forward(const RowArgs& a, int64_t begin, int64_t end);  \
  void backward(const RowArgs& a, int64_t begin, int64_t end); \
  }
UE_DECLARE_ISA(base)
#if defined(__x86_64__)
UE_DECLARE_ISA(avx2)
UE_DECLARE_ISA(avx512)
#endif
#undef UE_DECLARE_ISA

}  // namespace cpu
}  // namespace unlearn_ext
