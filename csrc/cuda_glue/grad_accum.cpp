// CUDA glue of the fused gradient accumulation (csrc/cuda/grad_accum.cu).
#include <torch/library.h>

#include "cuda/grad_accum.cuh"
#include "cuda_glue/init_kernels_glue.h"

namespace {

void grad_accumulate_cuda(const at::Tensor& acc, const at::Tensor& grad, double alpha) {
  TORCH_CHECK(acc.is_cuda() && acc.scalar_type() == at::kFloat && acc.is_contiguous(),
              "grad_accumulate_: the accumulator must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(grad.device() == acc.device() && grad.is_contiguous() && grad.numel() == acc.numel(),
              "grad_accumulate_: the gradient must be a contiguous tensor of the accumulator's size on ", acc.device());
  int code = -1;
  switch (grad.scalar_type()) {
    case at::kFloat: code = 0; break;
    case at::kBFloat16: code = 1; break;
    case at::kHalf: code = 2; break;
    default: TORCH_CHECK(false, "grad_accumulate_: gradient dtype ", grad.scalar_type(),
                         " is not supported (float32, bfloat16, float16)");
  }
  const c10::cuda::CUDAGuard guard(acc.device());
  C10_CUDA_CHECK(sk_grad_accumulate_launch(acc.data_ptr<float>(), grad.data_ptr(), code, acc.numel(), (float)alpha,
                                           c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) { m.impl("grad_accumulate_", &grad_accumulate_cuda); }
