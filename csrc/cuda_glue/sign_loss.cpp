// CUDA glue of the PS-LoRA sign-consistency loss: checks the tensors, then calls the plain launchers of
// csrc/cuda/sign_loss.cu on the current stream. Compiled only in CUDA builds. The kernels compute in
// float32; slice_kernels/ops/sign_loss.py casts the (small) factors before calling. The launchers' plan
// (sk_sign_loss_plan: how many segments each kernel splits its walk into, for this device's SM count) sizes the
// partials and the float32 workspace allocated here; the .cu stays free of torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/sign_loss_checks.h"
#include "cuda/sign_loss.cuh"

namespace {

SkSignLossArgs make_args(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                         const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode, double scaling,
                         double alpha_l, double inv_rms) {
  sk_checks::sign_loss_operands(A, B, H1, H2, kind, mode);
  // The launchers take raw pointers into A's device: every operand must live there.
  auto on_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.device() == A.device(), "sign_loss (cuda): ", name, " is on ", t.device(),
                ", A on ", A.device(), "; move the history with History.to(device)");
  };
  on_device(A, "A");
  on_device(B, "B");
  on_device(H1, kind == 0 ? "Bh" : (kind == 1 ? "H" : "the sign bits"));
  if (kind == 0) on_device(*H2, "Ah");
  TORCH_CHECK(A.scalar_type() == at::kFloat, "sign_loss (cuda): the kernels compute in float32, got ", A.scalar_type(),
              "; slice_kernels.ops.sign_loss casts the factors before calling");
  SkSignLossArgs a{};
  a.A = A.data_ptr<float>();
  a.B = B.data_ptr<float>();
  a.m = B.size(0);
  a.r = B.size(1);
  a.n = A.size(1);
  a.R = 0;
  a.kind = static_cast<int>(kind);
  a.mode = static_cast<int>(mode);
  a.scaling = static_cast<float>(scaling);
  a.alpha_l = static_cast<float>(alpha_l);
  a.inv_rms = static_cast<float>(inv_rms);
  if (kind == 0) {
    a.H1 = H1.data_ptr<float>();
    a.H2 = H2->data_ptr<float>();
    a.R = H1.size(1);
  } else if (kind == 1) {
    a.H1 = H1.data_ptr<float>();
  } else {
    a.bits = H1.data_ptr<uint8_t>();
  }
  return a;
}

// The split for A's device; the SM count comes from the runtime each call (a cheap attribute query), so a
// process that uses several kinds of GPU gets each one's own plan.
SkSignLossPlan make_plan(const SkSignLossArgs& a, const at::Tensor& A) {
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, A.device().index());
  TORCH_CHECK(err == cudaSuccess, "sign_loss (cuda): cannot read the multiprocessor count of ", A.device(), ": ",
              cudaGetErrorString(err));
  return sk_sign_loss_plan(a.m, a.n, a.r, sms, 0);
}

// nullptr when the plan needs no workspace (nothing split)
float* workspace_ptr(at::Tensor& ws) { return ws.numel() > 0 ? ws.data_ptr<float>() : nullptr; }

at::Tensor sign_loss_fwd_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& H1,
                              const std::optional<at::Tensor>& H2, int64_t kind, int64_t mode, double scaling,
                              double alpha_l, double inv_rms) {
  const SkSignLossArgs a = make_args(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms);
  c10::cuda::CUDAGuard guard(A.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  const SkSignLossPlan plan = make_plan(a, A);
  at::Tensor partial = at::empty({plan.partials_fwd}, A.options());
  const cudaError_t err = sk_sign_loss_fwd(a, plan, partial.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "sign_loss_fwd: CUDA launch failed: ", cudaGetErrorString(err));
  // The per-(row block, segment) partials are added in a fixed order, in float64: deterministic.
  return partial.sum(at::kDouble).div(static_cast<double>(a.m) * static_cast<double>(a.n)).to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> sign_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& A,
                                                      const at::Tensor& B, const at::Tensor& H1,
                                                      const std::optional<at::Tensor>& H2, int64_t kind,
                                                      int64_t mode, double scaling, double alpha_l,
                                                      double inv_rms) {
  const SkSignLossArgs a = make_args(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms);
  TORCH_CHECK(grad.is_cuda() && grad.device() == A.device() && grad.scalar_type() == at::kFloat && grad.numel() == 1,
              "sign_loss_bwd (cuda): grad must be a float32 scalar on ", A.device(), ", got ", grad.scalar_type(),
              " with ", grad.numel(), " elements on ", grad.device());
  c10::cuda::CUDAGuard guard(A.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  const SkSignLossPlan plan = make_plan(a, A);
  at::Tensor dA = at::empty(A.sizes(), A.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());
  at::Tensor ws = at::empty({plan.workspace}, A.options());
  const cudaError_t err = sk_sign_loss_bwd(a, plan, grad.data_ptr<float>(), dA.data_ptr<float>(),
                                           dB.data_ptr<float>(), workspace_ptr(ws), stream);
  TORCH_CHECK(err == cudaSuccess, "sign_loss_bwd: CUDA launch failed: ", cudaGetErrorString(err));
  return {dA, dB};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_loss_fwd_bwd_cuda(const at::Tensor& A, const at::Tensor& B,
                                                                      const at::Tensor& H1,
                                                                      const std::optional<at::Tensor>& H2,
                                                                      int64_t kind, int64_t mode, double scaling,
                                                                      double alpha_l, double inv_rms) {
  const SkSignLossArgs a = make_args(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms);
  c10::cuda::CUDAGuard guard(A.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(A.device().index()).stream();
  const SkSignLossPlan plan = make_plan(a, A);
  at::Tensor partial = at::empty({plan.partials_fwd_bwd}, A.options());
  at::Tensor dA = at::empty(A.sizes(), A.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());
  at::Tensor ws = at::empty({plan.workspace}, A.options());
  const cudaError_t err = sk_sign_loss_fwd_bwd(a, plan, partial.data_ptr<float>(), dA.data_ptr<float>(),
                                               dB.data_ptr<float>(), workspace_ptr(ws), stream);
  TORCH_CHECK(err == cudaSuccess, "sign_loss_fwd_bwd: CUDA launch failed: ", cudaGetErrorString(err));
  at::Tensor loss = partial.sum(at::kDouble).div(static_cast<double>(a.m) * static_cast<double>(a.n)).to(at::kFloat);
  return {loss, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) {
  m.impl("sign_loss_fwd", &sign_loss_fwd_cuda);
  m.impl("sign_loss_bwd", &sign_loss_bwd_cuda);
  m.impl("sign_loss_fwd_bwd", &sign_loss_fwd_bwd_cuda);
}
