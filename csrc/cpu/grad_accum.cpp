// CPU kernel of the gradient accumulation of SPEC §1 steps 1-2: acc (float32) += alpha * grad, the dtype
// conversion fused into the axpy so a bf16/fp16 gradient is never materialized as a float32 temporary.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

namespace {

template <typename T>
void axpy(float* acc, const T* g, int64_t n, float alpha) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) acc[i] += alpha * static_cast<float>(g[i]);
  });
}

void grad_accumulate_cpu(const at::Tensor& acc, const at::Tensor& grad, double alpha) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.device().is_cpu(),
              "grad_accumulate_: the accumulator must be a contiguous float32 CPU tensor");
  TORCH_CHECK(grad.is_contiguous() && grad.device().is_cpu() && grad.numel() == acc.numel(),
              "grad_accumulate_: the gradient must be a contiguous CPU tensor of the accumulator's size");
  const float a = static_cast<float>(alpha);
  float* out = acc.data_ptr<float>();
  switch (grad.scalar_type()) {
    case at::kFloat: axpy(out, grad.data_ptr<float>(), acc.numel(), a); break;
    case at::kBFloat16: axpy(out, grad.data_ptr<c10::BFloat16>(), acc.numel(), a); break;
    case at::kHalf: axpy(out, grad.data_ptr<c10::Half>(), acc.numel(), a); break;
    default: TORCH_CHECK(false, "grad_accumulate_: gradient dtype ", grad.scalar_type(),
                         " is not supported (float32, bfloat16, float16)");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) { m.impl("grad_accumulate_", &grad_accumulate_cpu); }
