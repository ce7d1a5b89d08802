// CUDA glue of the GORP step epilogue: checks the tensors, then calls the plain launchers of
// csrc/cuda/gorp_update.cu on the current stream. Compiled only in CUDA builds.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/gorp_update.cuh"

namespace {

void check(const at::Tensor& t, const at::Tensor& g, const char* name, bool same_dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == g.device(), "gorp_update: ", name, " must be on ", g.device());
  TORCH_CHECK(t.is_contiguous(), "gorp_update: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == g.numel(), "gorp_update: ", name, " has ", t.numel(), " elements, the gradient ",
              g.numel());
  if (same_dtype) TORCH_CHECK(t.scalar_type() == g.scalar_type(), "gorp_update: ", name, " dtype != gradient dtype");
}

template <typename T>
T* ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

void gorp_update_cuda(const at::Tensor& g, const std::optional<at::Tensor>& proj, at::Tensor exp_avg,
                      at::Tensor exp_avg_sq, const std::optional<at::Tensor>& param,
                      const std::optional<at::Tensor>& out, double beta1, double beta2, double eps, double bc1,
                      double bc2, double step_size, double decay) {
  check(g, g, "g", true);
  if (proj) check(*proj, g, "proj", true);
  check(exp_avg, g, "exp_avg", true);
  check(exp_avg_sq, g, "exp_avg_sq", true);
  if (out) check(*out, g, "out", true);
  if (param) check(*param, g, "param", false);
  c10::cuda::CUDAGuard guard(g.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  const SkGorpScalars s{beta1, beta2, eps, bc1, bc2, step_size, decay};
  const auto st = g.scalar_type();
  const auto pt = param ? param->scalar_type() : st;
  const int64_t n = g.numel();
  cudaError_t err;
  if (st == at::kFloat && pt == at::kFloat) {
    err = sk_gorp_update_f32(g.data_ptr<float>(), ptr<float>(proj), exp_avg.data_ptr<float>(),
                             exp_avg_sq.data_ptr<float>(), ptr<float>(param), ptr<float>(out), n, s, stream);
  } else if (st == at::kFloat && pt == at::kBFloat16) {
    auto* p = param ? reinterpret_cast<__nv_bfloat16*>(param->data_ptr<at::BFloat16>()) : nullptr;
    err = sk_gorp_update_f32_bf16(g.data_ptr<float>(), ptr<float>(proj), exp_avg.data_ptr<float>(),
                                  exp_avg_sq.data_ptr<float>(), p, ptr<float>(out), n, s, stream);
  } else if (st == at::kDouble && pt == at::kDouble) {
    err = sk_gorp_update_f64(g.data_ptr<double>(), ptr<double>(proj), exp_avg.data_ptr<double>(),
                             exp_avg_sq.data_ptr<double>(), ptr<double>(param), ptr<double>(out), n, s, stream);
  } else {
    TORCH_CHECK(false, "gorp_update: unsupported dtypes (state ", st, ", param ", pt,
                "); use float32/float64 state with a param of the same dtype, or bfloat16 param with float32 state");
  }
  TORCH_CHECK(err == cudaSuccess, "gorp_update: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) { m.impl("gorp_update", &gorp_update_cuda); }
