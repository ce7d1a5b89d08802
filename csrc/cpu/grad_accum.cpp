// CPU kernel of the gradient accumulation of SPEC §1 steps 1-2: acc (float32) += alpha * grad, the dtype
// conversion fused into the axpy so a bf16/fp16 gradient is never materialized as a float32 temporary.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "cpu/cpu_clones.h"

namespace {

// A bf16 value is the upper half of a float32: widening is a 16-bit shift. Spelled out here, always inline,
// because c10's conversion operator is an out-of-line candidate that would keep the AVX2 clone scalar.
__attribute__((always_inline)) inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The float32 and bf16 spans carry an AVX2 copy (cpu_clones.h): the baseline SSE loop ran at 0.6-0.7x torch's
// AVX2 add_ on float32 gradients. Multiply then add, never fused, in both copies: the same bits as before.
SK_CPU_CLONES void span_f32(float* __restrict acc, const float* __restrict g, int64_t b, int64_t e, float alpha) {
  for (int64_t i = b; i < e; ++i) acc[i] += alpha * g[i];
}

SK_CPU_CLONES void span_bf16(float* __restrict acc, const uint16_t* __restrict g, int64_t b, int64_t e,
                             float alpha) {
  for (int64_t i = b; i < e; ++i) acc[i] += alpha * bf16_bits_to_float(g[i]);
}

void span_f16(float* acc, const c10::Half* g, int64_t b, int64_t e, float alpha) {
  for (int64_t i = b; i < e; ++i) acc[i] += alpha * static_cast<float>(g[i]);
}

template <typename F>
void run(int64_t n, F&& span) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) { span(b, e); });
}

void grad_accumulate_cpu(const at::Tensor& acc, const at::Tensor& grad, double alpha) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.device().is_cpu(),
              "grad_accumulate_: the accumulator must be a contiguous float32 CPU tensor");
  TORCH_CHECK(grad.is_contiguous() && grad.device().is_cpu() && grad.numel() == acc.numel(),
              "grad_accumulate_: the gradient must be a contiguous CPU tensor of the accumulator's size");
  const float a = static_cast<float>(alpha);
  float* out = acc.data_ptr<float>();
  const int64_t n = acc.numel();
  switch (grad.scalar_type()) {
    case at::kFloat: {
      const float* g = grad.data_ptr<float>();
      run(n, [&](int64_t b, int64_t e) { span_f32(out, g, b, e, a); });
      break;
    }
    case at::kBFloat16: {
      const auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr<c10::BFloat16>());
      run(n, [&](int64_t b, int64_t e) { span_bf16(out, g, b, e, a); });
      break;
    }
    case at::kHalf: {
      const c10::Half* g = grad.data_ptr<c10::Half>();
      run(n, [&](int64_t b, int64_t e) { span_f16(out, g, b, e, a); });
      break;
    }
    default: TORCH_CHECK(false, "grad_accumulate_: gradient dtype ", grad.scalar_type(),
                         " is not supported (float32, bfloat16, float16)");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) { m.impl("grad_accumulate_", &grad_accumulate_cpu); }
