// CUDA kernel of the gradient accumulation (SPEC §1 steps 1-2): acc (float32) += alpha * grad with the
// bf16/fp16 → float32 conversion fused, a grid-stride loop over 64-bit indices (MLP weights of large models
// exceed 2³¹ elements). Mirrors _axpy_kernel of slice_kernels/ops/grad_accum.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/grad_accum.cuh"

namespace {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T>
__global__ void axpy_kernel(float* __restrict__ acc, const T* __restrict__ g, int64_t n, float alpha) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    acc[i] = fmaf(alpha, to_f32(g[i]), acc[i]);
}

}  // namespace

cudaError_t sk_grad_accumulate_launch(float* acc, const void* grad, int grad_dtype, int64_t n, float alpha,
                                      cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (n + threads - 1) / threads;
  const unsigned blocks = (unsigned)(want < 65536 ? want : 65536);
  switch (grad_dtype) {
    case 0: axpy_kernel<<<blocks, threads, 0, stream>>>(acc, static_cast<const float*>(grad), n, alpha); break;
    case 1: axpy_kernel<<<blocks, threads, 0, stream>>>(acc, static_cast<const __nv_bfloat16*>(grad), n, alpha); break;
    case 2: axpy_kernel<<<blocks, threads, 0, stream>>>(acc, static_cast<const __half*>(grad), n, alpha); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
