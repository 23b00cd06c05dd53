// Chooses the CPU row kernels once per process.
#include <cstdlib>
#include <cstring>

#include "row_kernels.h"

namespace unlearn_ext {
namespace cpu {
namespace {

Kernels choose() {
  const Kernels base_k{"base", &base::forward, &base::backward};
#if defined(__x86_64__)
  const Kernels avx2_k{"avx2", &avx2::forward, &avx2::backward};
  const Kernels avx512_k{"avx512", &avx512::forward, &avx512::backward};
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* forced = std::getenv("UNLEARN_EXT_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "base") == 0) return base_k;
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && has_avx2) return avx2_k;
  if (has_avx512 && (forced == nullptr || std::strcmp(forced, "avx512") == 0)) return avx512_k;
  if (has_avx2) return avx2_k;
#endif
  return base_k;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels chosen = choose();
  return chosen;
}

}  // namespace cpu
}  // namespace unlearn_ext
