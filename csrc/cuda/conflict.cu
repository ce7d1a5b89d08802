// CUDA kernels of the SLICE conflict statistics and surgery (SPEC §1 steps 3-4), multi-tensor: one launch
// covers every target layer through a table of fixed-size chunks, which load-balances a 58M-element MLP
// layer against a 1M-element k_proj. The algorithm mirrors the Triton kernels of slice_kernels/ops/conflict.py:
// float32 loads (float4 when aligned), float64 products and sums (a product of two float32 is exact in
// float64), block reduction in a fixed order, per-layer sum of chunk partials in chunk order: no atomics, so
// the result is reproducible run to run.
#include "cuda/conflict.cuh"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) r += smem[w];
  __syncthreads();
  return r;  // valid in thread 0
}

template <bool kHasPrev>
__global__ void __launch_bounds__(kThreads) stats_chunk_kernel(const SkChunk* __restrict__ chunks,
                                                               double* __restrict__ partial) {
  __shared__ double smem[kThreads / 32];
  const SkChunk w = chunks[blockIdx.x];
  const float* c = reinterpret_cast<const float*>(w.cur);
  const float* p = reinterpret_cast<const float*>(w.prev);
  double d = 0.0, np = 0.0, nc = 0.0;
  int64_t i = w.start + threadIdx.x * 4;
  const bool vec = ((w.cur | (kHasPrev ? w.prev : 0)) & 15) == 0 && (w.start & 3) == 0;
  if (vec) {
    for (; i + 3 < w.end; i += kThreads * 4) {
      const float4 x = *reinterpret_cast<const float4*>(c + i);
      nc += (double)x.x * x.x + (double)x.y * x.y + (double)x.z * x.z + (double)x.w * x.w;
      if (kHasPrev) {
        const float4 y = *reinterpret_cast<const float4*>(p + i);
        d += (double)x.x * y.x + (double)x.y * y.y + (double)x.z * y.z + (double)x.w * y.w;
        np += (double)y.x * y.x + (double)y.y * y.y + (double)y.z * y.z + (double)y.w * y.w;
      }
    }
    // the ragged tail (< 4 elements per thread's stride) is taken element-wise below
    const int64_t tail = w.start + ((w.end - w.start) / 4) * 4;
    i = tail + threadIdx.x;
  } else {
    i = w.start + threadIdx.x;
  }
  for (; i < w.end; i += kThreads) {
    const double x = c[i];
    nc += x * x;
    if (kHasPrev) {
      const double y = p[i];
      d += x * y;
      np += y * y;
    }
  }
  d = block_sum(d, smem);
  np = block_sum(np, smem);
  nc = block_sum(nc, smem);
  if (threadIdx.x == 0) {
    partial[3 * blockIdx.x] = d;
    partial[3 * blockIdx.x + 1] = np;
    partial[3 * blockIdx.x + 2] = nc;
  }
}

__global__ void stats_reduce_kernel(const double* __restrict__ partial, const int64_t* __restrict__ first,
                                    double* __restrict__ out) {
  // one thread per (layer, statistic): a layer has at most a few thousand chunks, summed in order
  const int64_t l = blockIdx.x;
  const int k = threadIdx.x;
  if (k >= 3) return;
  double s = 0.0;
  for (int64_t it = first[l]; it < first[l + 1]; ++it) s += partial[3 * it + k];
  out[3 * l + k] = s;
}

__device__ __forceinline__ float axpy64(float c, float p, double g) {
  // float64 multiply-add, one rounding: never less accurate than torch's float32 add_(alpha=γ)
  return (float)((double)c + g * (double)p);
}

__global__ void __launch_bounds__(kThreads) surgery_kernel(const SkChunk* __restrict__ chunks,
                                                           const int64_t* __restrict__ layer_of,
                                                           const double* __restrict__ gammas) {
  const SkChunk w = chunks[blockIdx.x];
  float* c = reinterpret_cast<float*>(w.cur);
  const float* p = reinterpret_cast<const float*>(w.prev);
  const double g = gammas[layer_of[blockIdx.x]];
  int64_t i;
  if (((w.cur | w.prev) & 15) == 0 && (w.start & 3) == 0) {  // 16-byte accesses where aligned
    for (i = w.start + threadIdx.x * 4; i + 3 < w.end; i += kThreads * 4) {
      float4 x = *reinterpret_cast<const float4*>(c + i);
      const float4 y = *reinterpret_cast<const float4*>(p + i);
      x.x = axpy64(x.x, y.x, g);
      x.y = axpy64(x.y, y.y, g);
      x.z = axpy64(x.z, y.z, g);
      x.w = axpy64(x.w, y.w, g);
      *reinterpret_cast<float4*>(c + i) = x;
    }
    i = w.start + ((w.end - w.start) / 4) * 4 + threadIdx.x;  // the < 4-element tail
  } else {
    i = w.start + threadIdx.x;
  }
  for (; i < w.end; i += kThreads) c[i] = axpy64(c[i], p[i], g);
}

}  // namespace

cudaError_t sk_conflict_stats_launch(const SkChunk* chunks, int64_t n_chunks, const int64_t* first, int64_t n_layers,
                                     bool has_prev, double* partial, double* out, cudaStream_t stream) {
  if (n_chunks > 0) {
    if (has_prev)
      stats_chunk_kernel<true><<<(unsigned)n_chunks, kThreads, 0, stream>>>(chunks, partial);
    else
      stats_chunk_kernel<false><<<(unsigned)n_chunks, kThreads, 0, stream>>>(chunks, partial);
  }
  stats_reduce_kernel<<<(unsigned)n_layers, 32, 0, stream>>>(partial, first, out);
  return cudaGetLastError();
}

cudaError_t sk_surgery_launch(const SkChunk* chunks, const int64_t* layer_of, int64_t n_chunks, const double* gammas,
                              cudaStream_t stream) {
  if (n_chunks > 0) surgery_kernel<<<(unsigned)n_chunks, kThreads, 0, stream>>>(chunks, layer_of, gammas);
  return cudaGetLastError();
}
