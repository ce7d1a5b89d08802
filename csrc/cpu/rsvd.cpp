// CPU kernel of the normalizer of the fast randomized SVD (slice_kernels/ops/rsvd.py): a batched Cholesky
// factorization Gram + s·I = RᵀR of the small q×q Gram matrices YᵀY, in float64, with pivot flooring.
//
// Why a kernel: Cholesky-QR (Q = Y·R⁻¹) replaces the Householder QR after each product of the power
// iteration, and what makes it safe on rank-deficient gradients is something LAPACK's potrf does not do: a
// pivot (Schur complement) below floor = rel_floor·max(diag) is rounding noise of a Gram matrix formed in
// float32, so it is replaced by the floor instead of failing. R stays triangular with a positive diagonal,
// hence invertible, so span(Y·R⁻¹) = span(Y) exactly, which is all a power-iteration step must keep; the
// noise direction comes out with norm ≤ 1 instead of blowing up. (A global shift s·I on every failure, as
// in shifted Cholesky-QR, damps the weak directions each step and collapses the basis over 4 iterations;
// the shift is used once, in the final orthonormalization, where Cholesky-QR2 follows it.)
// Output: R (upper triangular, float64) and the number of floored pivots per matrix.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Upper Cholesky of a + shift·I (q×q, row-major, symmetric) into R; returns the number of floored pivots.
int cholesky_upper_floored(const double* a, double* R, double* work, int64_t q, double shift, double floor) {
  std::copy(a, a + q * q, work);
  for (int64_t i = 0; i < q; ++i) work[i * q + i] += shift;
  std::fill(R, R + q * q, 0.0);
  int floored = 0;
  for (int64_t j = 0; j < q; ++j) {
    const double d = work[j * q + j];
    if (!(d > floor)) {  // also catches NaN
      // The whole remaining row is noise: keep it out of R (dividing it by a floored pivot is what makes a
      // modified Cholesky blow up) and let the column stand alone, scaled by the floor.
      R[j * q + j] = std::sqrt(floor);
      ++floored;
      continue;
    }
    const double r = std::sqrt(d);
    R[j * q + j] = r;
    for (int64_t k = j + 1; k < q; ++k) R[j * q + k] = work[j * q + k] / r;
    for (int64_t i = j + 1; i < q; ++i) {  // trailing update of the upper triangle only
      const double rji = R[j * q + i];
      double* wi = work + i * q;
      const double* rj = R + j * q;
      for (int64_t k = i; k < q; ++k) wi[k] -= rji * rj[k];
    }
  }
  return floored;
}

std::tuple<at::Tensor, at::Tensor> cholesky_shifted_cpu(const at::Tensor& gram_in, double rel_shift, double rel_floor) {
  TORCH_CHECK(gram_in.dim() == 3 && gram_in.size(1) == gram_in.size(2) && gram_in.device().is_cpu() &&
                  gram_in.scalar_type() == at::kDouble,
              "cholesky_shifted: expected a float64 CPU batch of square Gram matrices (b, q, q)");
  const at::Tensor gram = gram_in.contiguous();
  const int64_t b = gram.size(0), q = gram.size(1);
  at::Tensor R = at::zeros({b, q, q}, gram.options());
  at::Tensor floored = at::zeros({b}, gram.options().dtype(at::kInt));
  const double* g = gram.data_ptr<double>();
  double* r = R.data_ptr<double>();
  int* fl = floored.data_ptr<int>();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> work(q * q);
    for (int64_t m = lo; m < hi; ++m) {
      const double* a = g + m * q * q;
      double maxd = 0.0, trace = 0.0;
      for (int64_t i = 0; i < q; ++i) {
        maxd = std::max(maxd, a[i * q + i]);
        trace += a[i * q + i];
      }
      const double shift = rel_shift * trace;
      // Y = 0 (a zero gradient): floor 1 gives R = I, so Q = 0 and the caller sees S = 0 for the layer.
      const double floor = maxd + shift > 0.0 ? rel_floor * (maxd + shift) : 1.0;
      fl[m] = cholesky_upper_floored(a, r + m * q * q, work.data(), q, shift, floor);
    }
  });
  return {R, floored};
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) { m.impl("cholesky_shifted", &cholesky_shifted_cpu); }
