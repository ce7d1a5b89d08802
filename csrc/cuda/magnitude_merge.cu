// PS-LoRA magnitude merge from factors, plain CUDA (float32 arithmetic); mirrors the Triton kernel: one block
// per 32×32 output tile, each task's tile formed in turn by a shared-memory tiled product (any number of tasks,
// read from a device table), a later task replacing the kept entry only when strictly larger in magnitude (ties
// to the earliest), then the tile written or added into `out` in place: no m×n buffer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/magnitude_merge.cuh"
#include "cuda/sign_loss_tiles.cuh"

namespace {

using namespace sk_tiles;

template <typename O>
__device__ __forceinline__ float load_f(const O* p);
template <>
__device__ __forceinline__ float load_f<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load_f<__half>(const __half* p) { return __half2float(*p); }

template <typename O>
__device__ __forceinline__ O store_f(float v);
template <>
__device__ __forceinline__ float store_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half store_f<__half>(float v) { return __float2half(v); }

// __launch_bounds__(NT, 5): with the float4 tile product ptxas (CUDA 13, sm_90) otherwise takes 64 registers (4
// blocks per SM); 48, as before, keeps 5 blocks and spills nothing.
template <typename O>
__global__ void __launch_bounds__(NT, 5) merge_kernel(SkMergeArgs a, O* out) {
  __shared__ Smem sm;
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  // a 1-D grid over the tiles, row-tile major: gridDim.y would cap the rows at 65535·32
  const int64_t ntc = (a.n + BN - 1) / BN;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) / ntc) * BM, j0 = (static_cast<int64_t>(blockIdx.x) % ntc) * BN;
  float best[RPT], cur[RPT];
#pragma unroll
  for (int q = 0; q < RPT; ++q) best[q] = 0.f;
  for (int64_t k = 0; k < a.K; ++k) {
    const int64_t o0 = a.off[k], w = a.off[k + 1] - o0;
    const float sk = a.scal[k];
    tile_product(a.B + o0, a.Rt, a.A + o0 * a.n, a.n, i0, j0, a.m, a.n, w, cur, sm);
#pragma unroll
    for (int q = 0; q < RPT; ++q) {
      const float v = sk * cur[q];
      if (k == 0 || fabsf(v) > fabsf(best[q])) best[q] = v;
    }
  }
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    const int64_t i = i0 + ty + 8 * q, j = j0 + tx;
    if (i < a.m && j < a.n) {
      O* p = out + i * a.ldo + j;
      *p = store_f<O>(a.accumulate ? load_f<O>(p) + best[q] : best[q]);
    }
  }
}

}  // namespace

cudaError_t sk_magnitude_merge(const SkMergeArgs& a, void* out, int out_dtype, cudaStream_t stream) {
  if (a.K < 1) return cudaErrorInvalidValue;
  const int64_t tiles = ((a.m + BM - 1) / BM) * ((a.n + BN - 1) / BN);
  if (tiles == 0) return cudaSuccess;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(tiles);
  if (out_dtype == 0) {
    merge_kernel<float><<<grid, NT, 0, stream>>>(a, static_cast<float*>(out));
  } else if (out_dtype == 1) {
    merge_kernel<__nv_bfloat16><<<grid, NT, 0, stream>>>(a, static_cast<__nv_bfloat16*>(out));
  } else if (out_dtype == 2) {
    merge_kernel<__half><<<grid, NT, 0, stream>>>(a, static_cast<__half*>(out));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
