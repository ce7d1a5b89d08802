#pragma once
#include <cuda_runtime.h>
#include <cstdint>

// acc (float32) += alpha * grad, the conversion fused into the axpy. grad_dtype: 0 float32, 1 bfloat16,
// 2 float16. Returns the launch error.
cudaError_t sk_grad_accumulate_launch(float* acc, const void* grad, int grad_dtype, int64_t n, float alpha,
                                      cudaStream_t stream);
