// bfloat16 of the CUDA emulator (see cuda_runtime.h): storage and the two conversions the kernels use.
#pragma once
#include "cuda_runtime.h"
struct __nv_bfloat16 {
  uint16_t b;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// round to nearest even, as __float2bfloat16 does; NaN kept a (quiet) NaN
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}
