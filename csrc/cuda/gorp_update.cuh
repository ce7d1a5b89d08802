// GORP step epilogue, plain CUDA launchers (no torch headers, so nvcc alone compile-checks this file).
// Per element: g' = g - proj (proj may be null); m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2;
// u = (m/bc1)/(sqrt(v/bc2)+eps); out[i] = u (out may be null); param = decay*param - step_size*u (may be null).
// Returns the launch's cudaError_t so the caller can report it.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

struct SkGorpScalars {
  double beta1, beta2, eps, bc1, bc2, step_size, decay;
};

cudaError_t sk_gorp_update_f32(const float* g, const float* proj, float* m, float* v, float* param, float* out,
                               int64_t n, SkGorpScalars s, cudaStream_t stream);
// bfloat16 parameter, float32 state: the parameter is upcast, updated in float32, rounded once on store.
cudaError_t sk_gorp_update_f32_bf16(const float* g, const float* proj, float* m, float* v, __nv_bfloat16* param,
                                    float* out, int64_t n, SkGorpScalars s, cudaStream_t stream);
cudaError_t sk_gorp_update_f64(const double* g, const double* proj, double* m, double* v, double* param,
                               double* out, int64_t n, SkGorpScalars s, cudaStream_t stream);
