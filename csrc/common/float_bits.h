// Bit-level conversions between float and the 16-bit storage types, shared by the CPU
// kernels (where they vectorise) and the CUDA kernels (device and emulated host builds).
#pragma once

#include <cstdint>
#include <cstring>

#include "row_math.h"  // UE_HD

namespace unlearn_ext {

UE_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

UE_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

UE_HD float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, rounding to nearest even like torch; a NaN stays a (quiet) NaN.
UE_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0u | ((u >> 16) & 0x8000u))
                                         : static_cast<uint16_t>(rounded);
}

}  // namespace unlearn_ext
