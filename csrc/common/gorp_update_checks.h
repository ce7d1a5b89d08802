// Argument checks of the GORP step epilogue shared by the CPU kernel (csrc/cpu/gorp_update.cpp) and the CUDA
// glue (csrc/cuda_glue/gorp_update.cpp): both read every operand element-wise through raw pointers, so both
// need the same element counts, contiguity, one device and a supported dtype pairing. The device type
// (CPU or CUDA) of the gradient is each side's own check.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace sk_checks {

// The dtype pairings the kernels are instantiated for.
enum class GorpTypes { F32, F32_BF16_PARAM, F64 };

inline void gorp_operand(const at::Tensor& t, const at::Tensor& g, const char* name, bool same_dtype) {
  TORCH_CHECK(t.device() == g.device(), "gorp_update: ", name, " is on ", t.device(), ", the gradient on ", g.device());
  TORCH_CHECK(t.is_contiguous(), "gorp_update: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == g.numel(), "gorp_update: ", name, " has ", t.numel(), " elements, the gradient ",
              g.numel());
  if (same_dtype)
    TORCH_CHECK(t.scalar_type() == g.scalar_type(), "gorp_update: ", name, " is ", t.scalar_type(),
                ", the gradient ", g.scalar_type());
}

inline GorpTypes gorp_update_operands(const at::Tensor& g, const std::optional<at::Tensor>& proj,
                                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                      const std::optional<at::Tensor>& param, const std::optional<at::Tensor>& out) {
  gorp_operand(g, g, "g", true);
  if (proj) gorp_operand(*proj, g, "proj", true);
  gorp_operand(exp_avg, g, "exp_avg", true);
  gorp_operand(exp_avg_sq, g, "exp_avg_sq", true);
  if (out) gorp_operand(*out, g, "out", true);
  if (param) gorp_operand(*param, g, "param", false);
  TORCH_CHECK(param.has_value() || out.has_value(), "gorp_update: give param and/or out (else the step is lost)");
  const auto st = g.scalar_type();
  const auto pt = param ? param->scalar_type() : st;
  if (st == at::kFloat && pt == at::kFloat) return GorpTypes::F32;
  if (st == at::kFloat && pt == at::kBFloat16) return GorpTypes::F32_BF16_PARAM;
  TORCH_CHECK(st == at::kDouble && pt == at::kDouble, "gorp_update: unsupported dtypes (state ", st, ", param ", pt,
              "); use float32/float64 state with a param of the same dtype, or bfloat16 param with float32 state");
  return GorpTypes::F64;
}

}  // namespace sk_checks
