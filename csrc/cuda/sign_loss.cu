// PS-LoRA sign-consistency loss, plain CUDA (float32). Mirrors the Triton kernels:
// * forward: one block per 32-row block walks the column tiles, forms the ΔW and H tiles (shared-memory
//   tiled products over the rank), reduces the loss summand; one partial per block (deterministic);
// * dB: one block per row block, dB_rows = s·Σ_tiles G·Aᵀ accumulated in shared memory (on the training path
//   it also reduces the loss, so loss + gradients take two kernels, not three);
// * dA: one block per 32-column block, dA_cols = s·Σ_tiles Bᵀ·G accumulated in shared memory;
// * both gradient kernels take the rank in chunks of RC = 256 along gridDim.y (see RC below), so no rank is
//   refused for lack of shared memory;
// G = ∂L/∂ΔW lives only in shared memory, one tile at a time: no m×n buffer, no atomics.
#include "cuda/sign_loss.cuh"
#include "cuda/sign_loss_tiles.cuh"

namespace {

using namespace sk_tiles;

__device__ __forceinline__ float sgnf(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f); }

// ΔW tile into d[], H tile (±1 for bits) into h[]; entries outside the matrix are flagged by valid[].
__device__ void form_tiles(const SkSignLossArgs& a, int64_t i0, int64_t j0, float d[RPT], float h[RPT],
                           bool valid[RPT], Smem& sm) {
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  tile_product(a.B, a.r, a.A, a.n, i0, j0, a.m, a.n, a.r, d, sm);
  if (a.kind == 0) tile_product(a.H1, a.R, a.H2, a.n, i0, j0, a.m, a.n, a.R, h, sm);
  const int64_t nbytes = (a.n + 7) / 8;
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    const int64_t i = i0 + ty + 8 * q, j = j0 + tx;
    valid[q] = i < a.m && j < a.n;
    d[q] *= a.scaling;
    if (a.kind == 1) {
      h[q] = valid[q] ? a.H1[i * a.n + j] : 0.f;
    } else if (a.kind == 2) {
      h[q] = valid[q] ? (((a.bits[i * nbytes + (j >> 3)] >> (j & 7)) & 1) ? 1.f : -1.f) : 0.f;
    }
  }
}

__device__ __forceinline__ float summand(const SkSignLossArgs& a, float d, float h) {
  if (a.mode == 0) {
    const float t = a.kind == 2 ? h : tanhf(a.alpha_l * h);
    return 1.f - tanhf(a.alpha_l * d) * t;
  }
  const float v = -sgnf(h) * d;
  return v > 0.f ? v * a.inv_rms : 0.f;
}

__device__ __forceinline__ float derivative(const SkSignLossArgs& a, float d, float h) {
  if (a.mode == 0) {
    const float t = a.kind == 2 ? h : tanhf(a.alpha_l * h);
    const float td = tanhf(a.alpha_l * d);
    return -a.alpha_l * (1.f - td * td) * t;
  }
  const float sh = sgnf(h);
  return (-sh * d > 0.f) ? -sh * a.inv_rms : 0.f;
}

// The loss sums run in float64 (one add per entry, beside a tanhf): a thread walks 4·n/32 summands of one row
// block, 1792 at n = 14336, and a float32 running sum would lose up to that many roundings; the CPU kernel
// likewise sums at most 512 floats before going to float64.
__global__ void __launch_bounds__(NT) fwd_kernel(SkSignLossArgs a, float* partial) {
  __shared__ Smem sm;
  __shared__ double red[NT];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  double acc = 0.0;
  for (int64_t j0 = 0; j0 < a.n; j0 += BN) {
    float d[RPT], h[RPT];
    bool valid[RPT];
    form_tiles(a, i0, j0, d, h, valid, sm);
#pragma unroll
    for (int q = 0; q < RPT; ++q)
      if (valid[q]) acc += summand(a, d[q], h[q]);
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = NT / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<float>(red[0]);
}

// G tile (times gs) into sm.G; zero outside the matrix. With `loss`, also adds this thread's loss summands.
__device__ void g_tile(const SkSignLossArgs& a, int64_t i0, int64_t j0, float gs, Smem& sm, double* loss = nullptr) {
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  float d[RPT], h[RPT];
  bool valid[RPT];
  form_tiles(a, i0, j0, d, h, valid, sm);
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    if (loss != nullptr && valid[q]) *loss += summand(a, d[q], h[q]);
    sm.G[ty + 8 * q][tx] = valid[q] ? gs * derivative(a, d[q], h[q]) : 0.f;
  }
  __syncthreads();
}

// The rank is split into chunks of RC: a block accumulates only its chunk of dB columns (dA rows) in shared
// memory, and blockIdx.y picks the chunk. BM·RC floats (32 KiB) beside the static tiles (14.4 KiB) stay under the
// 48 KiB a block gets without an opt-in, so any rank launches; a rank above RC re-forms the G tiles once per chunk.
constexpr int RC = 256;
static_assert(sizeof(float) * BM * RC + sizeof(Smem) + sizeof(double) * NT <= 48 * 1024, "dB_kernel shared memory");
static_assert(sizeof(float) * RC * BN + sizeof(Smem) <= 48 * 1024, "dA_kernel shared memory");

__device__ __forceinline__ int64_t chunk_width(int64_t r, int64_t k0) { return r - k0 < RC ? r - k0 : RC; }

// dynamic shared memory: BM × min(r, RC) floats. grad == nullptr means an upstream gradient of 1; with `partial`,
// the chunk-0 block of each row block also reduces its loss sum into partial[blockIdx.x] (the one-pass training
// path).
__global__ void __launch_bounds__(NT) dB_kernel(SkSignLossArgs a, const float* grad, float* dB, float* partial) {
  __shared__ Smem sm;
  __shared__ double red[NT];
  extern __shared__ float accB[];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC, rc = chunk_width(a.r, k0);
  const bool want_loss = partial != nullptr && blockIdx.y == 0;  // block-uniform
  const float g0 = grad != nullptr ? grad[0] : 1.f;
  const float gs = g0 * a.scaling / (static_cast<float>(a.m) * static_cast<float>(a.n));
  double lacc = 0.0;
  for (int64_t e = threadIdx.x; e < BM * rc; e += NT) accB[e] = 0.f;
  for (int64_t j0 = 0; j0 < a.n; j0 += BN) {
    g_tile(a, i0, j0, gs, sm, want_loss ? &lacc : nullptr);
    for (int64_t e = threadIdx.x; e < BM * rc; e += NT) {
      const int64_t ii = e / rc, k = k0 + e % rc;
      const float* arow = a.A + k * a.n + j0;
      float s = 0.f;
      for (int jj = 0; jj < BN && j0 + jj < a.n; ++jj) s += sm.G[ii][jj] * arow[jj];
      accB[e] += s;
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < BM * rc; e += NT) {
    const int64_t i = i0 + e / rc;
    if (i < a.m) dB[i * a.r + k0 + e % rc] = accB[e];
  }
  if (want_loss) {
    red[threadIdx.x] = lacc;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<float>(red[0]);
  }
}

// dynamic shared memory: min(r, RC) × BN floats
__global__ void __launch_bounds__(NT) dA_kernel(SkSignLossArgs a, const float* grad, float* dA) {
  __shared__ Smem sm;
  extern __shared__ float accA[];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC, rc = chunk_width(a.r, k0);
  const float g0 = grad != nullptr ? grad[0] : 1.f;
  const float gs = g0 * a.scaling / (static_cast<float>(a.m) * static_cast<float>(a.n));
  for (int64_t e = threadIdx.x; e < rc * BN; e += NT) accA[e] = 0.f;
  for (int64_t i0 = 0; i0 < a.m; i0 += BM) {
    g_tile(a, i0, j0, gs, sm);
    for (int64_t e = threadIdx.x; e < rc * BN; e += NT) {
      const int64_t k = k0 + e / BN;
      const int jj = static_cast<int>(e % BN);
      float s = 0.f;
      for (int ii = 0; ii < BM && i0 + ii < a.m; ++ii) s += a.B[(i0 + ii) * a.r + k] * sm.G[ii][jj];
      accA[e] += s;
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < rc * BN; e += NT) {
    const int64_t j = j0 + e % BN;
    if (j < a.n) dA[(k0 + e / BN) * a.n + j] = accA[e];
  }
}

}  // namespace

int64_t sk_sign_loss_num_partials(int64_t m) { return (m + BM - 1) / BM; }

cudaError_t sk_sign_loss_fwd(const SkSignLossArgs& a, float* partial, cudaStream_t stream) {
  const int64_t nb = sk_sign_loss_num_partials(a.m);
  if (nb == 0) return cudaSuccess;
  fwd_kernel<<<static_cast<unsigned>(nb), NT, 0, stream>>>(a, partial);
  return cudaGetLastError();
}

static cudaError_t launch_grads(const SkSignLossArgs& a, const float* grad, float* dA, float* dB, float* partial,
                                cudaStream_t stream);

cudaError_t sk_sign_loss_bwd(const SkSignLossArgs& a, const float* grad, float* dA, float* dB, cudaStream_t stream) {
  return launch_grads(a, grad, dA, dB, nullptr, stream);
}

cudaError_t sk_sign_loss_fwd_bwd(const SkSignLossArgs& a, float* partial, float* dA, float* dB, cudaStream_t stream) {
  return launch_grads(a, nullptr, dA, dB, partial, stream);
}

static cudaError_t launch_grads(const SkSignLossArgs& a, const float* grad, float* dA, float* dB, float* partial,
                                cudaStream_t stream) {
  const int64_t nbr = (a.m + BM - 1) / BM, nbc = (a.n + BN - 1) / BN;
  // r = 0 still takes one chunk: on the training path its dB blocks are what reduce the loss.
  const int64_t nchunk = a.r > RC ? (a.r + RC - 1) / RC : 1;
  if (nchunk > 65535 || nbr > 0x7fffffff || nbc > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t rc = a.r < RC ? a.r : RC;
  const size_t shB = sizeof(float) * BM * rc, shA = sizeof(float) * rc * BN;
  if (nbr > 0) dB_kernel<<<dim3(static_cast<unsigned>(nbr), static_cast<unsigned>(nchunk)), NT, shB, stream>>>(
      a, grad, dB, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (nbc > 0) dA_kernel<<<dim3(static_cast<unsigned>(nbc), static_cast<unsigned>(nchunk)), NT, shA, stream>>>(a, grad, dA);
  return cudaGetLastError();
}
