// Shared-memory tile product of the PS-LoRA CUDA kernels (sign_loss.cu, magnitude_merge.cu): 32×32 output
// tiles, 256 threads, each thread owning 4 entries (rows ty + 8q, column tx), the rank walked in chunks of 32.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace sk_tiles {

constexpr int BM = 32;
constexpr int BN = 32;
constexpr int KC = 32;
constexpr int NT = 256;          // threads per block
constexpr int RPT = BM * BN / NT;  // tile entries per thread (4): rows ty + 8q, column tx

struct Smem {
  float L[BM][KC + 1];
  float R[KC][BN + 1];
  float G[BM][BN + 1];
};

// acc[q] = Σ_k L[(i0 + ty + 8q)*ldl + k] · Rm[k*ldr + j0 + tx] over k < K (rows < m, cols < n, else 0).
// Every thread of the block must call it (it synchronizes).
__device__ inline void tile_product(const float* L, int64_t ldl, const float* Rm, int64_t ldr, int64_t i0, int64_t j0,
                             int64_t m, int64_t n, int64_t K, float acc[RPT], Smem& sm) {
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
#pragma unroll
  for (int q = 0; q < RPT; ++q) acc[q] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    for (int e = threadIdx.x; e < BM * KC; e += NT) {
      const int ii = e / KC, kk = e % KC;
      const int64_t i = i0 + ii, k = k0 + kk;
      sm.L[ii][kk] = (i < m && k < K) ? L[i * ldl + k] : 0.f;
    }
    for (int e = threadIdx.x; e < KC * BN; e += NT) {
      const int kk = e / BN, jj = e % BN;
      const int64_t k = k0 + kk, j = j0 + jj;
      sm.R[kk][jj] = (k < K && j < n) ? Rm[k * ldr + j] : 0.f;
    }
    __syncthreads();
    // Only the ranks that exist: a rank below KC (r = 16 is common) would otherwise spend half the FMAs on the
    // zero padding. The products skipped are exact zeros, so the sums are bit for bit the same.
    const int kn = K - k0 < KC ? static_cast<int>(K - k0) : KC;
#pragma unroll 8
    for (int kk = 0; kk < kn; ++kk) {
      const float rv = sm.R[kk][tx];
#pragma unroll
      for (int q = 0; q < RPT; ++q) acc[q] += sm.L[ty + 8 * q][kk] * rv;
    }
    __syncthreads();
  }
}

}  // namespace sk_tiles
