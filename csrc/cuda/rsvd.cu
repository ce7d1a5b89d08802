// CUDA kernel of the normalizer of the fast randomized SVD: batched Cholesky of the q×q float64 Gram
// matrices with pivot flooring (the algorithm and its rationale: csrc/cpu/rsvd.cpp). One block per matrix;
// the Schur complement lives in global scratch (q = 256 at r = 64: 512 KiB per matrix, L2-resident), each
// column step is a parallel rank-1 update of the trailing upper triangle. Everything stays on the device,
// so the caller never synchronizes to check a factorization (cholesky_ex + a host check would).
#include "cuda/rsvd.cuh"

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) cholesky_floored_kernel(const double* __restrict__ gram,
                                                                    double* __restrict__ work, double* __restrict__ R,
                                                                    int* __restrict__ floored, int64_t q,
                                                                    double rel_shift, double rel_floor) {
  const int64_t base = (int64_t)blockIdx.x * q * q;
  const double* a = gram + base;
  double* w = work + base;
  double* r = R + base;
  __shared__ double s_shift, s_floor, s_piv, s_red[kThreads];
  __shared__ int s_low, s_count;

  // trace and max(diag), reduced in a fixed order
  double tr = 0.0, mx = 0.0;
  for (int64_t i = threadIdx.x; i < q; i += kThreads) {
    const double d = a[i * q + i];
    tr += d;
    mx = d > mx ? d : mx;
  }
  s_red[threadIdx.x] = tr;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int k = 0; k < kThreads; ++k) t += s_red[k];
    s_shift = rel_shift * t;
  }
  __syncthreads();
  s_red[threadIdx.x] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    double m = 0.0;
    for (int k = 0; k < kThreads; ++k) m = s_red[k] > m ? s_red[k] : m;
    const double top = m + s_shift;
    s_floor = top > 0.0 ? rel_floor * top : 1.0;  // Y = 0: R = I, Q = 0
    s_count = 0;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < q * q; e += kThreads) {
    const int64_t i = e / q, k = e % q;
    w[e] = a[e] + (i == k ? s_shift : 0.0);
    r[e] = 0.0;
  }
  __syncthreads();

  for (int64_t j = 0; j < q; ++j) {
    __syncthreads();  // every thread has read last column's s_low / s_piv before thread 0 overwrites them
    if (threadIdx.x == 0) {
      const double d = w[j * q + j];
      s_low = !(d > s_floor);  // also catches NaN
      s_piv = sqrt(s_low ? s_floor : d);
      r[j * q + j] = s_piv;
      s_count += s_low;
    }
    __syncthreads();
    if (s_low) continue;  // a floored row is noise: kept out of R, nothing to update (uniform branch)
    const double piv = s_piv;
    for (int64_t k = j + 1 + threadIdx.x; k < q; k += kThreads) r[j * q + k] = w[j * q + k] / piv;
    __syncthreads();
    // trailing update of the upper triangle: w[i][k] -= r[j][i]·r[j][k] for j < i ≤ k
    const int64_t t = q - j - 1;
    for (int64_t e = threadIdx.x; e < t * t; e += kThreads) {
      const int64_t i = j + 1 + e / t, k = j + 1 + e % t;
      if (k >= i) w[i * q + k] -= r[j * q + i] * r[j * q + k];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) floored[blockIdx.x] = s_count;
}

}  // namespace

cudaError_t sk_cholesky_shifted_launch(const double* gram, double* work, double* R, int* floored, int64_t b, int64_t q,
                                       double rel_shift, double rel_floor, cudaStream_t stream) {
  if (b == 0 || q == 0) return cudaSuccess;
  cholesky_floored_kernel<<<(unsigned)b, kThreads, 0, stream>>>(gram, work, R, floored, q, rel_shift, rel_floor);
  return cudaGetLastError();
}
