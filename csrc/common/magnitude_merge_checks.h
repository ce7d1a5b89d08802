// Argument checks of the magnitude merge from factors shared by the CPU kernel (csrc/cpu/magnitude_merge.cpp)
// and the CUDA glue (csrc/cuda_glue/magnitude_merge.cpp). Per side stay the device and the dtypes each kernel
// computes in.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace sk_checks {

// B (m, ΣR) and A (ΣR, n) contiguous with one dtype; out m×n with unit column stride and rows that do not
// overlap; offsets [0, ..., ΣR], non-decreasing, one more than the scalings (at least one task). The kernels
// read task k's factors at columns offsets[k]..offsets[k+1] through raw pointers, so a decreasing or
// out-of-range offset would read outside B and A.
inline void magnitude_merge_operands(const at::Tensor& B, const at::Tensor& A, at::IntArrayRef offsets,
                                     at::ArrayRef<double> scalings, const at::Tensor& out) {
  TORCH_CHECK(B.dim() == 2 && A.dim() == 2 && B.size(1) == A.size(0), "magnitude_merge: B must be (m, ΣR) and A (ΣR, n); got ",
              B.sizes(), " and ", A.sizes());
  TORCH_CHECK(B.is_contiguous() && A.is_contiguous(), "magnitude_merge: factors must be contiguous");
  TORCH_CHECK(B.scalar_type() == A.scalar_type(), "magnitude_merge: B and A must share a dtype, got ", B.scalar_type(),
              " and ", A.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == B.size(0) && out.size(1) == A.size(1) && out.stride(1) == 1 &&
                  (out.size(0) <= 1 || out.stride(0) >= out.size(1)),
              "magnitude_merge: out must be m×n = ", B.size(0), "×", A.size(1),
              " with unit column stride and non-overlapping rows; got sizes ", out.sizes(), ", strides ", out.strides(),
              " (pass a transposed W as W.T of its row-major storage, as slice_kernels.magnitude_merge does)");
  const int64_t K = static_cast<int64_t>(scalings.size());
  TORCH_CHECK(K >= 1 && static_cast<int64_t>(offsets.size()) == K + 1 && offsets.front() == 0 &&
                  offsets.back() == B.size(1),
              "magnitude_merge: offsets must be [0, ..., ΣR = ", B.size(1), "] with one more entry than the ", K,
              " scalings (at least one task); got ", offsets);
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(offsets[k] <= offsets[k + 1], "magnitude_merge: offsets must not decrease; task ", k, " spans ",
                offsets[k], "..", offsets[k + 1]);
}

}  // namespace sk_checks
