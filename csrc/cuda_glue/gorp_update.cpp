// CUDA glue of the GORP step epilogue: checks the tensors, then calls the plain launchers of
// csrc/cuda/gorp_update.cu on the current stream. Compiled only in CUDA builds.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "common/gorp_update_checks.h"
#include "cuda/gorp_update.cuh"

namespace {

template <typename T>
T* ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void gorp_update_cuda(const at::Tensor& g, const std::optional<at::Tensor>& proj, at::Tensor exp_avg,
                      at::Tensor exp_avg_sq, const std::optional<at::Tensor>& param,
                      const std::optional<at::Tensor>& out, double beta1, double beta2, double eps, double bc1,
                      double bc2, double step_size, double decay) {
  const sk_checks::GorpTypes types = sk_checks::gorp_update_operands(g, proj, exp_avg, exp_avg_sq, param, out);
  TORCH_CHECK(g.is_cuda(), "gorp_update (cuda): the gradient must be a CUDA tensor, got ", g.device());
  c10::cuda::CUDAGuard guard(g.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  const SkGorpScalars s{beta1, beta2, eps, bc1, bc2, step_size, decay};
  const int64_t n = g.numel();
  cudaError_t err = cudaSuccess;
  switch (types) {
    case sk_checks::GorpTypes::F32:
      err = sk_gorp_update_f32(g.data_ptr<float>(), ptr<float>(proj), exp_avg.data_ptr<float>(),
                               exp_avg_sq.data_ptr<float>(), ptr<float>(param), ptr<float>(out), n, s, stream);
      break;
    case sk_checks::GorpTypes::F32_BF16_PARAM: {
      auto* p = param ? reinterpret_cast<__nv_bfloat16*>(param->data_ptr<at::BFloat16>()) : nullptr;
      err = sk_gorp_update_f32_bf16(g.data_ptr<float>(), ptr<float>(proj), exp_avg.data_ptr<float>(),
                                    exp_avg_sq.data_ptr<float>(), p, ptr<float>(out), n, s, stream);
      break;
    }
    case sk_checks::GorpTypes::F64:
      err = sk_gorp_update_f64(g.data_ptr<double>(), ptr<double>(proj), exp_avg.data_ptr<double>(),
                               exp_avg_sq.data_ptr<double>(), ptr<double>(param), ptr<double>(out), n, s, stream);
      break;
  }
  TORCH_CHECK(err == cudaSuccess, "gorp_update: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) { m.impl("gorp_update", &gorp_update_cuda); }
