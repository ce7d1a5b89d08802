// PS-LoRA sign-consistency loss, tiled CPU kernels (SPEC §3; algorithm in slice_kernels/ops/sign_loss.py).
//
// Row blocks of BM rows are spread over threads; inside one, column tiles of BN entries are formed in a
// small per-thread buffer: the ΔW tile (B·A, one BLAS call on the tile), the H tile (from its factors by a
// BLAS call, read from the dense input, or expanded from its sign bits), then the loss summand (forward) or
// G = ∂L/∂ΔW (backward, written over the ΔW tile), contracted at once: dB_rows += G·A_colsᵀ and
// dA_cols += B_rowsᵀ·G (BLAS on the tile). Extra memory: per thread two BM×BN tiles and one r×n dA
// accumulator; no m×n buffer. The forward's per-block sums are added in block order, so the result does not
// depend on the thread count.
// The elementwise loops must vectorize: they dominate once the tile products go to BLAS. GCC will not
// if-convert the selects in tanh_k while floating-point traps are assumed possible, so this file is compiled
// without trapping-math (nothing here relies on traps; results are unchanged).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/sign_loss_checks.h"
#include "cpu/cpu_clones.h"

namespace {

constexpr int64_t BM = 64;
constexpr int64_t BN = 512;

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

// tanh in float32 from arithmetic only (std::tanh is a scalar libm call): an odd Taylor polynomial below
// |x| = 1/8 (error < 1e-10), else (1 − e)/(1 + e) with e = exp(−2|x|) by range reduction and a degree-7
// polynomial (about 1 ulp). float64 keeps std::tanh, the float64 tests' reference precision.
__attribute__((always_inline)) inline float tanh_k(float x) {
  const float ax = std::fabs(x);
  const float x2 = x * x;
  const float small = x * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f + x2 * (-17.f / 315.f))));
  const float axc = ax < 43.f ? ax : 43.f;  // e underflows to 0 well before; keeps 2^n a normal float
  const float y = -2.f * axc;
  const int32_t ni = -static_cast<int32_t>(-y * 1.44269504f + 0.5f);  // round(y·log2 e), y ≤ 0
  const float n = static_cast<float>(ni);
  const float r = (y - n * 0.693359375f) - n * (-2.12194440e-4f);
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6.f + r * (1.f / 24.f + r * (1.f / 120.f +
                  r * (1.f / 720.f + r * (1.f / 5040.f)))))));
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = p * scale;
  const float t = std::copysign((1.f - e) / (1.f + e), x);
  return ax < 0.125f ? small : t;
}
inline double tanh_k(double x) { return std::tanh(x); }

template <typename T>
inline T sgn(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

// Σ f[j] as kLanes interleaved partial sums added in lane order: the loop vectorizes without reassociating
// (GCC keeps a plain float sum scalar), and the value is the same in every clone below.
constexpr int64_t kLanes = 8;
template <typename T>
__attribute__((always_inline)) inline T lane_sum(const T* f, int64_t len) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += f[j + l];
  T tail = T(0);
  for (; j < len; ++j) tail += f[j];
  T sum = T(0);
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum + tail;
}

// The elementwise work of one tile row, in one pass: with kLoss the loss summands f[j] at ΔW = s·d[j], H = h[j]
// (h is ±1 in bit form: tanh(α_ℓ H) becomes sign(H)) into f, returning their sum (see lane_sum); with kGrad
// g[j] ← gscale·∂f/∂ΔW over d in place. One pass for both, so the training path evaluates each tanh pair once
// per entry.
// d, h and f never overlap (f is a row buffer of its own: were it d, GCC's runtime overlap check would send the
// forward to the scalar copy of the loop).
// An AVX2 copy beside the baseline one (cpu_clones.h): the tanh_k arithmetic is most of the kernel's time at
// small ranks once the tile products go to BLAS, and the baseline build runs it 4 wide. No fma in either copy,
// so both give the same bits. tanh_k must be always_inline: left out of line, the AVX2 copy calls the
// default-target one and stays scalar (an earlier AVX2 attempt ran 2–5× slower for that reason). float64 keeps
// std::tanh (scalar libm), the float64 tests' reference precision.
template <typename T, bool kLoss, bool kGrad>
SK_CPU_CLONES T row_pass(T* __restrict d, const T* __restrict h, T* __restrict f, int64_t len, T s, T al, T inv_rms,
                         int mode, bool bits, T gscale) {
  if (mode == 0 && bits) {
    for (int64_t j = 0; j < len; ++j) {
      const T t = h[j], td = tanh_k(al * s * d[j]);
      if (kLoss) f[j] = T(1) - td * t;
      if (kGrad) d[j] = gscale * (-al * (T(1) - td * td) * t);
    }
  } else if (mode == 0) {
    for (int64_t j = 0; j < len; ++j) {
      const T t = tanh_k(al * h[j]), td = tanh_k(al * s * d[j]);
      if (kLoss) f[j] = T(1) - td * t;
      if (kGrad) d[j] = gscale * (-al * (T(1) - td * td) * t);
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const T sh = sgn(h[j]), v = -sh * s * d[j];
      if (kLoss) f[j] = v > T(0) ? v * inv_rms : T(0);
      if (kGrad) d[j] = v > T(0) ? -sh * inv_rms * gscale : T(0);
    }
  }
  return kLoss ? lane_sum(f, len) : T(0);
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
                  const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode) {
  sk_checks::sign_loss_operands(A, B, H1, H2, kind, mode);
  TORCH_CHECK(A.device().is_cpu() && B.device().is_cpu() && H1.device().is_cpu() && (!H2 || H2->device().is_cpu()),
              "sign_loss (cpp): A, B and the history must be CPU tensors");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "sign_loss (cpp): float32 or float64 inputs expected, got ", A.scalar_type());
}

// The H tile of rows i0.., columns j0..: a pointer to bi rows of stride `ld`. Factors: hbuf = Bh_rows·Ah_cols
// (BLAS); dense: the input itself; bits: expanded to ±1 in hbuf.
template <typename T>
const T* h_tile(const Operands<T>& p, const at::Tensor& H1, const std::optional<at::Tensor>& H2, int64_t i0,
                int64_t bi, int64_t j0, int64_t bj, at::Tensor& hbuf, int64_t& ld) {
  if (p.kind == 1) {
    ld = p.n;
    return p.H1 + i0 * p.n + j0;
  }
  at::Tensor h = hbuf.narrow(0, 0, bi * bj).view({bi, bj});
  ld = bj;
  if (p.kind == 0) {
    at::mm_out(h, H1.narrow(0, i0, bi), H2->narrow(1, j0, bj));
  } else {
    T* hp = h.data_ptr<T>();
    for (int64_t ii = 0; ii < bi; ++ii) {
      const uint8_t* row = p.bits + (i0 + ii) * p.nbytes;
      for (int64_t jj = 0; jj < bj; ++jj) {
        const int64_t j = j0 + jj;
        hp[ii * bj + jj] = ((row[j >> 3] >> (j & 7)) & 1) ? T(1) : T(-1);
      }
    }
  }
  return h.data_ptr<T>();
}

template <typename T>
double forward_impl(const Operands<T>& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                    const std::optional<at::Tensor>& H2) {
  const int64_t nblk = (p.m + BM - 1) / BM;
  std::vector<double> partial(nblk, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor dbuf = at::empty({BM * BN}, A.options());
    at::Tensor hbuf = at::empty({BM * BN}, A.options());
    std::vector<T> frow(BN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * BM, bi = std::min(BM, p.m - i0);
      double acc = 0.0;
      for (int64_t j0 = 0; j0 < p.n; j0 += BN) {
        const int64_t bj = std::min(BN, p.n - j0);
        at::Tensor d = dbuf.narrow(0, 0, bi * bj).view({bi, bj});
        at::mm_out(d, B.narrow(0, i0, bi), A.narrow(1, j0, bj));
        int64_t ld;
        const T* h = h_tile(p, H1, H2, i0, bi, j0, bj, hbuf, ld);
        T* dp = d.data_ptr<T>();
        for (int64_t ii = 0; ii < bi; ++ii)
          acc += static_cast<double>(
              row_pass<T, true, false>(dp + ii * bj, h + ii * ld, frow.data(), bj, p.s, p.alpha_l, p.inv_rms, p.mode,
                                       p.kind == 2, T(0)));
      }
      partial[b] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total / static_cast<double>(p.m * p.n);
}

// Gradients (times gscale) and, when `partial` is given, the loss sums of each row block from the same tiles:
// the training path then needs one pass over the tiles instead of two.
template <typename T>
void backward_impl(const Operands<T>& p, const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                   const std::optional<at::Tensor>& H2, T gscale, at::Tensor& dA, at::Tensor& dB,
                   std::vector<double>* partial = nullptr) {
  const int64_t nblk = (p.m + BM - 1) / BM;
  if (partial) partial->assign(nblk, 0.0);
  const int nthreads = at::get_num_threads();
  // dA is a reduction over row blocks: one r×n accumulator per thread, added in thread order afterwards.
  std::vector<at::Tensor> dA_local(nthreads);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    const int tid = at::get_thread_num();
    if (!dA_local[tid].defined()) dA_local[tid] = at::zeros({p.r, p.n}, A.options());
    at::Tensor& acc = dA_local[tid];
    at::Tensor dbuf = at::empty({BM * BN}, A.options());
    at::Tensor hbuf = at::empty({BM * BN}, A.options());
    std::vector<T> frow(BN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * BM, bi = std::min(BM, p.m - i0);
      double lacc = 0.0;
      at::Tensor dB_rows = dB.narrow(0, i0, bi);
      dB_rows.zero_();
      const at::Tensor B_rows = B.narrow(0, i0, bi);
      for (int64_t j0 = 0; j0 < p.n; j0 += BN) {
        const int64_t bj = std::min(BN, p.n - j0);
        const at::Tensor A_cols = A.narrow(1, j0, bj);
        at::Tensor g = dbuf.narrow(0, 0, bi * bj).view({bi, bj});
        at::mm_out(g, B_rows, A_cols);
        int64_t ld;
        const T* h = h_tile(p, H1, H2, i0, bi, j0, bj, hbuf, ld);
        T* gp = g.data_ptr<T>();
        // G overwrites the ΔW tile in place; on the training path the loss summands come from the same pass
        for (int64_t ii = 0; ii < bi; ++ii) {
          T* gr = gp + ii * bj;
          const T* hr = h + ii * ld;
          if (partial)
            lacc += static_cast<double>(row_pass<T, true, true>(gr, hr, frow.data(), bj, p.s, p.alpha_l, p.inv_rms,
                                                                p.mode, p.kind == 2, gscale));
          else
            row_pass<T, false, true>(gr, hr, frow.data(), bj, p.s, p.alpha_l, p.inv_rms, p.mode, p.kind == 2,
                                     gscale);
        }
        dB_rows.addmm_(g, A_cols.t());
        acc.narrow(1, j0, bj).addmm_(B_rows.t(), g);
      }
      if (partial) (*partial)[b] = lacc;
    }
  });
  dA.zero_();
  for (auto& a : dA_local)
    if (a.defined()) dA.add_(a);
}

at::Tensor sign_loss_fwd_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                             const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode, double scaling,
                             double alpha_l, double inv_rms) {
  check_inputs(A, B, H1, H2, kind, mode);
  at::Tensor out = at::empty({}, A.options());
  if (A.scalar_type() == at::kDouble) {
    out.data_ptr<double>()[0] =
        forward_impl(operands<double>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), A, B, H1, H2);
  } else {
    out.data_ptr<float>()[0] =
        static_cast<float>(forward_impl(operands<float>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), A, B, H1, H2));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sign_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& A,
                                                     const at::Tensor& B, const at::Tensor& H1,
                                                     const std::optional<at::Tensor>& H2, int64_t kind,
                                                     int64_t mode, double scaling, double alpha_l,
                                                     double inv_rms) {
  check_inputs(A, B, H1, H2, kind, mode);
  TORCH_CHECK(grad.numel() == 1, "sign_loss_bwd: grad must be a scalar");
  at::Tensor dA = at::empty(A.sizes(), A.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());
  const double mn = static_cast<double>(B.size(0)) * static_cast<double>(A.size(1));
  // ∂(mean)/∂ΔW = f'/(m·n); ΔW = s·B·A brings one more factor s into dA and dB.
  if (A.scalar_type() == at::kDouble) {
    const double g = grad.item<double>() * scaling / mn;
    backward_impl(operands<double>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), A, B, H1, H2, g, dA, dB);
  } else {
    const float g = static_cast<float>(grad.item<double>() * scaling / mn);
    backward_impl(operands<float>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), A, B, H1, H2, g, dA, dB);
  }
  return {dA, dB};
}

// The training path: (L_dir, ∂L_dir/∂A, ∂L_dir/∂B) in one pass; autograd scales the gradients by the upstream.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_loss_fwd_bwd_cpu(const at::Tensor& A, const at::Tensor& B,
                                                                     const at::Tensor& H1,
                                                                     const std::optional<at::Tensor>& H2,
                                                                     int64_t kind, int64_t mode, double scaling,
                                                                     double alpha_l, double inv_rms) {
  check_inputs(A, B, H1, H2, kind, mode);
  at::Tensor dA = at::empty(A.sizes(), A.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());
  at::Tensor out = at::empty({}, A.options());
  const double mn = static_cast<double>(B.size(0)) * static_cast<double>(A.size(1));
  std::vector<double> partial;
  if (A.scalar_type() == at::kDouble) {
    backward_impl(operands<double>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), A, B, H1, H2,
                  scaling / mn, dA, dB, &partial);
  } else {
    backward_impl(operands<float>(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms), A, B, H1, H2,
                  static_cast<float>(scaling / mn), dA, dB, &partial);
  }
  double total = 0.0;
  for (double v : partial) total += v;
  if (A.scalar_type() == at::kDouble) {
    out.data_ptr<double>()[0] = total / mn;
  } else {
    out.data_ptr<float>()[0] = static_cast<float>(total / mn);
  }
  return {out, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) {
  m.impl("sign_loss_fwd", &sign_loss_fwd_cpu);
  m.impl("sign_loss_bwd", &sign_loss_bwd_cpu);
  m.impl("sign_loss_fwd_bwd", &sign_loss_fwd_bwd_cpu);
}
