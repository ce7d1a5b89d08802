// PS-LoRA sign-consistency loss, tiled CPU kernels (SPEC §3; algorithm in slice_kernels/ops/sign_loss.py).
//
// Row blocks of BM rows are spread over threads; inside one, column tiles of BN entries are formed in a
// small buffer: the ΔW tile (s·B·A), the H tile (from its factors, the dense input, or its sign bits), then
// the loss summand (forward) or G = ∂L/∂ΔW (backward), contracted at once with A and B. No m×n buffer.
// The forward's per-block sums are added in block order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BM = 32;
constexpr int64_t BN = 256;

template <typename T>
struct Operands {
  const T* A;   // r×n
  const T* B;   // m×r
  const T* H1;  // kind 0: Bh m×R; kind 1: H m×n
  const T* H2;  // kind 0: Ah R×n
  const uint8_t* bits;  // kind 2: m × ceil(n/8)
  int64_t m, n, r, R, nbytes;
  int kind, mode;
  T s, alpha_l, inv_rms;
};

// out[ii*BN + jj] = scale * Σ_k L[(i0+ii)*K + k] * Rm[k*n + j0+jj]
template <typename T>
inline void tile_matmul(const T* L, const T* Rm, int64_t K, int64_t n, int64_t i0, int64_t bi, int64_t j0,
                        int64_t bj, T scale, T* out) {
  for (int64_t ii = 0; ii < bi; ++ii) {
    T* o = out + ii * BN;
    for (int64_t jj = 0; jj < bj; ++jj) o[jj] = T(0);
    const T* l = L + (i0 + ii) * K;
    for (int64_t k = 0; k < K; ++k) {
      const T lk = l[k] * scale;
      const T* rr = Rm + k * n + j0;
      for (int64_t jj = 0; jj < bj; ++jj) o[jj] += lk * rr[jj];
    }
  }
}

// Fill `d` with the ΔW tile and `h` with the H tile (kind 2: ±1).
template <typename T>
inline void form_tiles(const Operands<T>& p, int64_t i0, int64_t bi, int64_t j0, int64_t bj, T* d, T* h) {
  tile_matmul(p.B, p.A, p.r, p.n, i0, bi, j0, bj, p.s, d);
  if (p.kind == 0) {
    tile_matmul(p.H1, p.H2, p.R, p.n, i0, bi, j0, bj, T(1), h);
  } else if (p.kind == 1) {
    for (int64_t ii = 0; ii < bi; ++ii)
      for (int64_t jj = 0; jj < bj; ++jj) h[ii * BN + jj] = p.H1[(i0 + ii) * p.n + j0 + jj];
  } else {
    for (int64_t ii = 0; ii < bi; ++ii) {
      const uint8_t* row = p.bits + (i0 + ii) * p.nbytes;
      for (int64_t jj = 0; jj < bj; ++jj) {
        const int64_t j = j0 + jj;
        h[ii * BN + jj] = ((row[j >> 3] >> (j & 7)) & 1) ? T(1) : T(-1);
      }
    }
  }
}

// tanh in float32 from arithmetic only, so the summand loops vectorize (std::tanh is a scalar libm call and
// dominated the kernel): an odd Taylor polynomial below |x| = 1/8 (error < 1e-10), else (1 − e)/(1 + e) with
// e = exp(−2|x|) by range reduction and a degree-7 polynomial (about 1 ulp). float64 keeps std::tanh.
inline float tanh_k(float x) {
  const float ax = x < 0.f ? -x : x;
  const float x2 = x * x;
  const float small = x * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f + x2 * (-17.f / 315.f))));
  float y = -2.f * ax;
  y = y < -87.f ? -87.f : y;
  const int ni = -static_cast<int>(-y * 1.44269504f + 0.5f);  // round(y·log2 e), y ≤ 0
  const float n = static_cast<float>(ni);
  const float r = (y - n * 0.693359375f) - n * (-2.12194440e-4f);
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f + r * (1.f / 120.f +
                  r * (1.f / 720.f + r * (1.f / 5040.f)))))));
  union { int32_t i; float f; } sc;
  sc.i = (ni + 127) << 23;
  const float e = p * sc.f;
  float t = (1.f - e) / (1.f + e);
  t = x < 0.f ? -t : t;
  return ax < 0.125f ? small : t;
}
inline double tanh_k(double x) { return std::tanh(x); }

template <typename T>
inline T sgn(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

template <typename T>
inline T summand(const Operands<T>& p, T d, T h) {
  if (p.mode == 0) {
    const T t = p.kind == 2 ? h : tanh_k(p.alpha_l * h);
    return T(1) - tanh_k(p.alpha_l * d) * t;
  }
  const T v = -sgn(h) * d;
  return v > T(0) ? v * p.inv_rms : T(0);
}

template <typename T>
inline T derivative(const Operands<T>& p, T d, T h) {
  if (p.mode == 0) {
    const T t = p.kind == 2 ? h : tanh_k(p.alpha_l * h);
    const T td = tanh_k(p.alpha_l * d);
    return -p.alpha_l * (T(1) - td * td) * t;
  }
  const T sh = sgn(h);
  return (-sh * d > T(0)) ? -sh * p.inv_rms : T(0);
}

template <typename T>
Operands<T> operands(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                     const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode, double s, double alpha_l,
                     double inv_rms) {
  Operands<T> p{};
  p.A = A.data_ptr<T>();
  p.B = B.data_ptr<T>();
  p.m = B.size(0);
  p.r = B.size(1);
  p.n = A.size(1);
  p.kind = static_cast<int>(kind);
  p.mode = static_cast<int>(mode);
  p.s = T(s);
  p.alpha_l = T(alpha_l);
  p.inv_rms = T(inv_rms);
  p.nbytes = (p.n + 7) / 8;
  if (kind == 0) {
    p.H1 = H1.data_ptr<T>();
    p.H2 = H2->data_ptr<T>();
    p.R = H1.size(1);
  } else if (kind == 1) {
    p.H1 = H1.data_ptr<T>();
  } else {
    p.bits = H1.data_ptr<uint8_t>();
  }
  return p;
}

void check_inputs(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                  const std::optional<at::Tensor>& H2, int64_t kind) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && B.size(1) == A.size(0), "sign_loss: A must be (r, n), B (m, r)");
  TORCH_CHECK(A.is_contiguous() && B.is_contiguous() && H1.is_contiguous(), "sign_loss: inputs must be contiguous");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "sign_loss: A and B must share a dtype");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "sign_loss (cpp): float32 or float64 inputs expected");
  const int64_t m = B.size(0), n = A.size(1);
  if (kind == 0) {
    TORCH_CHECK(H2.has_value() && H2->is_contiguous(), "sign_loss: factor history needs Ah (contiguous)");
    TORCH_CHECK(H1.size(0) == m && H2->size(1) == n && H1.size(1) == H2->size(0), "sign_loss: Bh/Ah shapes");
    TORCH_CHECK(H1.scalar_type() == A.scalar_type() && H2->scalar_type() == A.scalar_type(),
                "sign_loss: history factors must have A's dtype");
  } else if (kind == 1) {
    TORCH_CHECK(H1.size(0) == m && H1.size(1) == n && H1.scalar_type() == A.scalar_type(),
                "sign_loss: dense history must be m×n with A's dtype");
  } else if (kind == 2) {
    TORCH_CHECK(H1.scalar_type() == at::kByte && H1.size(0) == m && H1.size(1) == (n + 7) / 8,
                "sign_loss: sign bits must be uint8 (m, ceil(n/8))");
  } else {
    TORCH_CHECK(false, "sign_loss: kind must be 0 (factors), 1 (dense) or 2 (bits)");
  }
}

template <typename T>
double forward_impl(const Operands<T>& p) {
  const int64_t nblk = (p.m + BM - 1) / BM;
  std::vector<double> partial(nblk, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> d(BM * BN), h(BM * BN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * BM, bi = std::min(BM, p.m - i0);
      double acc = 0.0;
      for (int64_t j0 = 0; j0 < p.n; j0 += BN) {
        const int64_t bj = std::min(BN, p.n - j0);
        form_tiles(p, i0, bi, j0, bj, d.data(), h.data());
        for (int64_t ii = 0; ii < bi; ++ii) {
          T rowacc = T(0);
          for (int64_t jj = 0; jj < bj; ++jj) rowacc += summand(p, d[ii * BN + jj], h[ii * BN + jj]);
          acc += static_cast<double>(rowacc);
        }
      }
      partial[b] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total / static_cast<double>(p.m * p.n);
}

template <typename T>
void backward_impl(const Operands<T>& p, T gscale, T* dA, T* dB) {
  const int64_t nblk = (p.m + BM - 1) / BM;
  const int nthreads = at::get_num_threads();
  // dA is a reduction over row blocks: one r×n accumulator per thread, added in thread order afterwards.
  std::vector<std::vector<T>> dA_local(nthreads);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    auto& acc = dA_local[tid];
    if (acc.empty()) acc.assign(p.r * p.n, T(0));
    std::vector<T> d(BM * BN), h(BM * BN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * BM, bi = std::min(BM, p.m - i0);
      for (int64_t ii = 0; ii < bi; ++ii)
        for (int64_t k = 0; k < p.r; ++k) dB[(i0 + ii) * p.r + k] = T(0);
      for (int64_t j0 = 0; j0 < p.n; j0 += BN) {
        const int64_t bj = std::min(BN, p.n - j0);
        form_tiles(p, i0, bi, j0, bj, d.data(), h.data());
        for (int64_t ii = 0; ii < bi; ++ii) {
          T* g = d.data() + ii * BN;  // G overwrites the ΔW tile in place
          const T* hh = h.data() + ii * BN;
          for (int64_t jj = 0; jj < bj; ++jj) g[jj] = gscale * derivative(p, g[jj], hh[jj]);
          const int64_t i = i0 + ii;
          for (int64_t k = 0; k < p.r; ++k) {
            const T* a = p.A + k * p.n + j0;
            T s = T(0);
            for (int64_t jj = 0; jj < bj; ++jj) s += g[jj] * a[jj];
            dB[i * p.r + k] += s;
            const T bik = p.B[i * p.r + k];
            T* da = acc.data() + k * p.n + j0;
            for (int64_t jj = 0; jj < bj; ++jj) da[jj] += bik * g[jj];
          }
        }
      }
    }
  });
  for (int64_t i = 0; i < p.r * p.n; ++i) dA[i] = T(0);
  for (auto& acc : dA_local) {
    if (acc.empty()) continue;
    for (int64_t i = 0; i < p.r * p.n; ++i) dA[i] += acc[i];
  }
}

at::Tensor sign_loss_fwd_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                             const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode, double scaling,
                             double alpha_l, double inv_rms) {
  check_inputs(A, B, H1, H2, kind);
  at::Tensor out = at::empty({}, A.options());
  if (A.scalar_type() == at::kDouble) {
    out.data_ptr<double>()[0] = forward_impl(operands<double>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms));
  } else {
    out.data_ptr<float>()[0] =
        static_cast<float>(forward_impl(operands<float>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms)));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sign_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& A,
                                                     const at::Tensor& B, const at::Tensor& H1,
                                                     const std::optional<at::Tensor>& H2, int64_t kind,
                                                     int64_t mode, double scaling, double alpha_l,
                                                     double inv_rms) {
  check_inputs(A, B, H1, H2, kind);
  TORCH_CHECK(grad.numel() == 1, "sign_loss_bwd: grad must be a scalar");
  at::Tensor dA = at::empty(A.sizes(), A.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());
  const double mn = static_cast<double>(B.size(0)) * static_cast<double>(A.size(1));
  // ∂(mean)/∂ΔW = f'/(m·n); ΔW = s·B·A brings one more factor s into dA and dB.
  if (A.scalar_type() == at::kDouble) {
    const double g = grad.item<double>() * scaling / mn;
    backward_impl(operands<double>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), g, dA.data_ptr<double>(),
                  dB.data_ptr<double>());
  } else {
    const float g = static_cast<float>(grad.item<double>() * scaling / mn);
    backward_impl(operands<float>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), g, dA.data_ptr<float>(),
                  dB.data_ptr<float>());
  }
  return {dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) {
  m.impl("sign_loss_fwd", &sign_loss_fwd_cpu);
  m.impl("sign_loss_bwd", &sign_loss_bwd_cpu);
}
