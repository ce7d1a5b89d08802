// float16 of the CUDA emulator (see cuda_runtime.h): the compiler's _Float16 rounds to nearest even, as
// __float2half does.
#pragma once
#include "cuda_runtime.h"
struct __half {
  _Float16 h;
};
inline float __half2float(__half v) { return float(v.h); }
inline __half __float2half(float f) { return __half{_Float16(f)}; }
