// Shared-memory tile product of the PS-LoRA CUDA kernels (sign_loss.cu, magnitude_merge.cu): 32×32 output
// tiles, 256 threads, each thread owning 4 entries (rows ty + 8q, column tx), the rank walked in chunks of 32.
//
// Vector loads along the rank (why): the inner loops are shared-load bound, not FMA bound, by instruction count. A
// scalar rank step costs one LDS of R[k][tx] and one (warp-broadcast) LDS of L[ty + 8q][k] per row for 4 FFMAs, 0.8
// FFMA per load, where an H100 SM issues about 4 warp-FFMAs per warp-LDS. So every shared row is padded to KP =
// 36 floats (a multiple of 4: 16-byte aligned) and R is kept transposed (Rt[col][k]): four rank steps take one
// LDS.128 of Rt[tx][k..k+3] and one broadcast LDS.128 of L[ty + 8q][k..k+3] per row, 5 loads for 16 FFMAs (3.2).
// Banks: lane tx reads banks 4·tx + (k mod 32) .. +3; a 128-bit load is served a quarter warp (8 lanes) at a
// time, and 8 consecutive lanes start at 4·tx mod 32 = 0, 4, .., 28: every bank once, conflict-free.
// Staging stays coalesced (a warp reads 32 consecutive floats of one row of L or R); the transposed store of R
// (lane jj writes Rt[jj][kk], banks 4·jj + kk: lanes jj, jj + 8, jj + 16, jj + 24 share a bank) is a 4-way bank
// conflict, once per chunk, where the compute loop then reads every float4 of Rt 8 times (once per warp).
// Bits (why they do not move): each entry's sum still runs k ascending from +0 with one multiply-add per k
// (dot4 below adds x, y, z, w in that order, never as a tree), as the scalar loop did. A chunk whose rank is not
// a multiple of 4 ends with one float4 step that adds only the 1 to 3 products below kn (dot_head): adding the
// staged zeros instead would keep every value but not every bit, since on the GPU an FFMA whose exact result is
// a negative number below half the smallest subnormal rounds to -0, and -0 + 0·0 = +0.
// SK_TILES_SCALAR_ORDER (defined by tests/backends/test_cuda_emulated.py only) compiles the scalar loops instead, over
// the same shared layout and ranks: the emulator compares both builds bit for bit.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace sk_tiles {

constexpr int BM = 32;
constexpr int BN = 32;
constexpr int KC = 32;
constexpr int NT = 256;          // threads per block
constexpr int RPT = BM * BN / NT;  // tile entries per thread (4): rows ty + 8q, column tx
constexpr int KP = KC + 4;       // row stride of every shared tile: float4 rows, see the header

// G is the loss gradient tile of sign_loss.cu (row-major for dB, transposed for dA); magnitude_merge.cu leaves it
// unused.
struct alignas(16) Smem {
  float L[BM][KP];   // L[row][k]
  float Rt[BN][KP];  // R transposed: Rt[col][k]
  float G[BM][KP];
};
static_assert(KP % 4 == 0 && KC % 4 == 0 && KP >= KC && KP >= BM && KP >= BN, "float4 rows of KC ranks");
static_assert(offsetof(Smem, Rt) % 16 == 0 && offsetof(Smem, G) % 16 == 0 && (KP * sizeof(float)) % 16 == 0,
              "every shared row starts 16-byte aligned (LDS.128)");

// p must be 16-byte aligned: a row of Smem plus a multiple of 4 floats.
__device__ __forceinline__ float4 lds4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// acc + a.x·b.x + a.y·b.y + a.z·b.z + a.w·b.w, one multiply-add at a time in that order (the scalar loop's)
__device__ __forceinline__ float dot4(float acc, const float4& a, const float4& b) {
  acc += a.x * b.x;
  acc += a.y * b.y;
  acc += a.z * b.z;
  acc += a.w * b.w;
  return acc;
}

// acc + a.x·b.x [+ a.y·b.y [+ a.z·b.z]]: the first n (1 to 3) terms of dot4, in its order
__device__ __forceinline__ float dot_head(float acc, const float4& a, const float4& b, int n) {
  acc += a.x * b.x;
  if (n > 1) acc += a.y * b.y;
  if (n > 2) acc += a.z * b.z;
  return acc;
}

// acc[q] += Σ_{k < kn} L[ty + 8q][k] · Rt[tx][k], k ascending (kn <= KC, block-uniform)
__device__ __forceinline__ void rank_steps(const Smem& sm, int kn, int tx, int ty, float acc[RPT]) {
#ifdef SK_TILES_SCALAR_ORDER
  for (int kk = 0; kk < kn; ++kk) {
    const float rv = sm.Rt[tx][kk];
#pragma unroll
    for (int q = 0; q < RPT; ++q) acc[q] += sm.L[ty + 8 * q][kk] * rv;
  }
#else
  const int kf = kn & ~3;  // the ranks in whole float4 steps
  // Unrolled over the chunk with a block-uniform exit: immediate shared offsets and no loop counter (24
  // instructions per 4 steps in the sm_90 SASS, 26 as a counted loop), and ptxas does not hoist the loads past the
  // exits, so at most 5 float4 are live (no kernel gained registers over the scalar loop).
#pragma unroll
  for (int kk = 0; kk < KC; kk += 4) {
    if (kk >= kf) break;
    const float4 rv = lds4(&sm.Rt[tx][kk]);
#pragma unroll
    for (int q = 0; q < RPT; ++q) acc[q] = dot4(acc[q], lds4(&sm.L[ty + 8 * q][kk]), rv);
  }
  if (kf < kn) {  // 1 to 3 ranks left: their products only, not the zeros past kn (see the header)
    const float4 rv = lds4(&sm.Rt[tx][kf]);
#pragma unroll
    for (int q = 0; q < RPT; ++q) acc[q] = dot_head(acc[q], lds4(&sm.L[ty + 8 * q][kf]), rv, kn - kf);
  }
#endif
}

// acc[q] = Σ_k L[(i0 + ty + 8q)*ldl + k] · Rm[k*ldr + j0 + tx] over k < K (rows < m, cols < n, else 0).
// Every thread of the block must call it (it synchronizes).
__device__ inline void tile_product(const float* L, int64_t ldl, const float* Rm, int64_t ldr, int64_t i0, int64_t j0,
                             int64_t m, int64_t n, int64_t K, float acc[RPT], Smem& sm) {
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
#pragma unroll
  for (int q = 0; q < RPT; ++q) acc[q] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    // a warp reads 32 consecutive k of one row of L and stores them along one shared row (conflict-free)
    for (int e = threadIdx.x; e < BM * KC; e += NT) {
      const int ii = e / KC, kk = e % KC;
      const int64_t i = i0 + ii, k = k0 + kk;
      sm.L[ii][kk] = (i < m && k < K) ? L[i * ldl + k] : 0.f;
    }
    // a warp reads 32 consecutive columns of one row of R; the transposed store is the 4-way conflict above
    for (int e = threadIdx.x; e < KC * BN; e += NT) {
      const int kk = e / BN, jj = e % BN;
      const int64_t k = k0 + kk, j = j0 + jj;
      sm.Rt[jj][kk] = (k < K && j < n) ? Rm[k * ldr + j] : 0.f;
    }
    __syncthreads();
    // Only the ranks that exist: a rank below KC (r = 16 is common) would otherwise spend half the FMAs on the
    // zero padding. The products skipped are exact zeros, so the sums keep their values.
    const int kn = K - k0 < KC ? static_cast<int>(K - k0) : KC;
    rank_steps(sm, kn, tx, ty, acc);
    __syncthreads();
  }
}

}  // namespace sk_tiles
