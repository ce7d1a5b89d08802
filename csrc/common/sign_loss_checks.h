// Argument checks of the sign-consistency loss shared by the CPU kernel (csrc/cpu/sign_loss.cpp) and the CUDA
// glue (csrc/cuda_glue/sign_loss.cpp), so both refuse the same inputs with the same words. What differs per
// side stays there: the device the tensors must be on and the compute dtypes each kernel accepts.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace sk_checks {

// Shapes, contiguity, kind and mode of (A r×n, B m×r, history), and the history's dtype against A's: the
// kernels read every operand through a raw row-major pointer, so anything else would be read wrongly.
inline void sign_loss_operands(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                               const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && B.size(1) == A.size(0), "sign_loss: A must be (r, n), B (m, r); got A ",
              A.sizes(), " and B ", B.sizes());
  TORCH_CHECK(mode == 0 || mode == 1, "sign_loss: mode must be 0 (tanh) or 1 (hinge), got ", mode);
  TORCH_CHECK(A.is_contiguous() && B.is_contiguous() && H1.is_contiguous(),
              "sign_loss: A, B and the history must be contiguous (slice_kernels.sign_consistency_loss makes them so)");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "sign_loss: A and B must share a dtype, got ", A.scalar_type(),
              " and ", B.scalar_type());
  const int64_t m = B.size(0), n = A.size(1);
  if (kind == 0) {
    TORCH_CHECK(H2.has_value() && H2->is_contiguous(), "sign_loss: factor history needs Ah (contiguous)");
    TORCH_CHECK(H1.dim() == 2 && H2->dim() == 2 && H1.size(0) == m && H2->size(1) == n && H1.size(1) == H2->size(0),
                "sign_loss: factor history must be Bh (m, R) and Ah (R, n) with m = ", m, ", n = ", n, "; got ",
                H1.sizes(), " and ", H2->sizes());
    TORCH_CHECK(H1.scalar_type() == A.scalar_type() && H2->scalar_type() == A.scalar_type(),
                "sign_loss: history factors must have A's dtype (", A.scalar_type(), ")");
  } else if (kind == 1) {
    TORCH_CHECK(H1.dim() == 2 && H1.size(0) == m && H1.size(1) == n && H1.scalar_type() == A.scalar_type(),
                "sign_loss: dense history must be m×n = ", m, "×", n, " with A's dtype; got ", H1.sizes(), " ",
                H1.scalar_type());
  } else if (kind == 2) {
    TORCH_CHECK(H1.scalar_type() == at::kByte && H1.dim() == 2 && H1.size(0) == m && H1.size(1) == (n + 7) / 8,
                "sign_loss: sign bits must be uint8 (m, ceil(n/8)) = (", m, ", ", (n + 7) / 8, "); got ", H1.sizes(),
                " ", H1.scalar_type());
  } else {
    TORCH_CHECK(false, "sign_loss: kind must be 0 (factors), 1 (dense) or 2 (bits), got ", kind);
  }
}

}  // namespace sk_checks
