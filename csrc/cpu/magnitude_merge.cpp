// PS-LoRA magnitude merge from factors, tiled CPU kernel (SPEC §3; slice_kernels/ops/magnitude_merge.py).
//
// K updates ΔW_k = s_k·B_k·A_k are given as one concatenated B (m×ΣR) and A (ΣR×n) with column offsets.
// For each tile of `out`, every update's tile is formed in a small per-thread buffer (one BLAS call) and the
// entry of largest |·| is kept; a later task replaces the current best only when strictly larger, so ties go to the earliest task.
// With accumulate=true the winner is added into `out` (W += merged) tile by tile: no m×n buffer.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // lets GCC vectorize the selects of keep_larger
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/magnitude_merge_checks.h"

namespace {

constexpr int64_t BM = 64;
constexpr int64_t BN = 512;

// best ← v where |v| > |best| (strictly: ties keep the earlier task). Vectorized (see the pragma above).
template <typename T>
void keep_larger(T* best, const T* cur, int64_t len, T s, bool first) {
  if (first) {
    for (int64_t j = 0; j < len; ++j) best[j] = s * cur[j];
    return;
  }
  for (int64_t j = 0; j < len; ++j) {
    const T v = s * cur[j];
    best[j] = std::abs(v) > std::abs(best[j]) ? v : best[j];
  }
}

template <typename T, typename O>
void merge_impl(const at::Tensor& B, const at::Tensor& A, const std::vector<int64_t>& off,
                const std::vector<double>& scal, O* out, int64_t ldo, bool accumulate) {
  const int64_t m = B.size(0), n = A.size(1);
  const int64_t K = static_cast<int64_t>(scal.size());
  const int64_t nblk = (m + BM - 1) / BM;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor cbuf = at::empty({BM * BN}, B.options());
    std::vector<T> best(BM * BN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * BM, bi = std::min(BM, m - i0);
      for (int64_t j0 = 0; j0 < n; j0 += BN) {
        const int64_t bj = std::min(BN, n - j0);
        at::Tensor cur = cbuf.narrow(0, 0, bi * bj).view({bi, bj});
        for (int64_t k = 0; k < K; ++k) {
          // this task's tile s_k·B_k·A_k, one BLAS call
          at::mm_out(cur, B.narrow(0, i0, bi).narrow(1, off[k], off[k + 1] - off[k]),
                     A.narrow(0, off[k], off[k + 1] - off[k]).narrow(1, j0, bj));
          keep_larger(best.data(), cur.data_ptr<T>(), bi * bj, T(scal[k]), k == 0);
        }
        for (int64_t ii = 0; ii < bi; ++ii) {
          O* o = out + (i0 + ii) * ldo + j0;
          const T* bst = best.data() + ii * bj;
          if (accumulate) {
            for (int64_t jj = 0; jj < bj; ++jj) o[jj] = static_cast<O>(static_cast<T>(o[jj]) + bst[jj]);
          } else {
            for (int64_t jj = 0; jj < bj; ++jj) o[jj] = static_cast<O>(bst[jj]);
          }
        }
      }
    }
  });
}

void magnitude_merge_factors_cpu(const at::Tensor& B, const at::Tensor& A, at::IntArrayRef offsets,
                                 at::ArrayRef<double> scalings, const at::Tensor& out, bool accumulate) {
  sk_checks::magnitude_merge_operands(B, A, offsets, scalings, out);
  TORCH_CHECK(B.device().is_cpu() && out.device().is_cpu(), "magnitude_merge (cpp): B, A and out must be CPU tensors");
  TORCH_CHECK(B.scalar_type() == at::kFloat || B.scalar_type() == at::kDouble,
              "magnitude_merge (cpp): float32 or float64 factors expected, got ", B.scalar_type());
  std::vector<int64_t> off(offsets.begin(), offsets.end());
  std::vector<double> scal(scalings.begin(), scalings.end());
  const int64_t ldo = out.stride(0);
  const auto ot = out.scalar_type();
  if (B.scalar_type() == at::kDouble) {
    // float64 factors: compare and add in float64, round once into W's dtype (as the torch backend does)
    if (ot == at::kDouble) {
      merge_impl<double, double>(B, A, off, scal, out.data_ptr<double>(), ldo, accumulate);
    } else if (ot == at::kFloat) {
      merge_impl<double, float>(B, A, off, scal, out.data_ptr<float>(), ldo, accumulate);
    } else if (ot == at::kBFloat16) {
      merge_impl<double, at::BFloat16>(B, A, off, scal, out.data_ptr<at::BFloat16>(), ldo, accumulate);
    } else if (ot == at::kHalf) {
      merge_impl<double, at::Half>(B, A, off, scal, out.data_ptr<at::Half>(), ldo, accumulate);
    } else {
      TORCH_CHECK(false, "magnitude_merge: out must be float32, float64, bfloat16 or float16");
    }
  } else if (ot == at::kFloat) {
    merge_impl<float, float>(B, A, off, scal, out.data_ptr<float>(),
                             ldo, accumulate);
  } else if (ot == at::kBFloat16) {
    merge_impl<float, at::BFloat16>(B, A, off, scal, out.data_ptr<at::BFloat16>(), ldo, accumulate);
  } else if (ot == at::kHalf) {
    merge_impl<float, at::Half>(B, A, off, scal, out.data_ptr<at::Half>(), ldo, accumulate);
  } else {
    TORCH_CHECK(false, "magnitude_merge: out must be float32, float64, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) {
  m.impl("magnitude_merge_factors", &magnitude_merge_factors_cpu);
}
