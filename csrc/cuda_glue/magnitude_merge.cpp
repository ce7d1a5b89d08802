// CUDA glue of the PS-LoRA magnitude merge: checks the tensors, copies the task table (offsets, scalings) to the
// device in stream order, calls csrc/cuda/magnitude_merge.cu on the current stream. Any number of tasks: the
// kernel walks the table, so ties go to the earliest task exactly as in the CPU kernel.
#include <torch/library.h>

#include <vector>

#include "common/magnitude_merge_checks.h"
#include "cuda/magnitude_merge.cuh"
#include "cuda_glue/init_kernels_glue.h"

namespace {

void magnitude_merge_factors_cuda(const at::Tensor& B, const at::Tensor& A, at::IntArrayRef offsets,
                                  at::ArrayRef<double> scalings, const at::Tensor& out, bool accumulate) {
  sk_checks::magnitude_merge_operands(B, A, offsets, scalings, out);
  TORCH_CHECK(B.is_cuda() && A.device() == B.device() && out.device() == B.device(),
              "magnitude_merge (cuda): B, A and out must be on one CUDA device; got ", B.device(), ", ", A.device(),
              " and ", out.device());
  TORCH_CHECK(B.scalar_type() == at::kFloat, "magnitude_merge (cuda): factors must be float32, got ", B.scalar_type(),
              "; slice_kernels.magnitude_merge casts them");
  int dt;
  switch (out.scalar_type()) {
    case at::kFloat: dt = 0; break;
    case at::kBFloat16: dt = 1; break;
    case at::kHalf: dt = 2; break;
    default: TORCH_CHECK(false, "magnitude_merge (cuda): out must be float32, bfloat16 or float16, got ", out.scalar_type());
  }
  const int64_t K = static_cast<int64_t>(scalings.size());
  const std::vector<int64_t> off(offsets.begin(), offsets.end());
  std::vector<float> scal(K);
  for (int64_t k = 0; k < K; ++k) scal[k] = static_cast<float>(scalings[k]);
  const c10::cuda::CUDAGuard guard(B.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(B.device().index()).stream();
  const at::Tensor off_d = sk_glue::to_device(off, B.device(), stream);
  const at::Tensor scal_d = sk_glue::to_device(scal, B.device(), stream);
  SkMergeArgs a{};
  a.B = B.data_ptr<float>();
  a.A = A.data_ptr<float>();
  a.off = reinterpret_cast<const int64_t*>(off_d.data_ptr());
  a.scal = reinterpret_cast<const float*>(scal_d.data_ptr());
  a.m = B.size(0);
  a.n = A.size(1);
  a.Rt = B.size(1);
  a.ldo = out.stride(0);
  a.K = K;
  a.accumulate = accumulate ? 1 : 0;
  const cudaError_t err = sk_magnitude_merge(a, out.data_ptr(), dt, stream);
  TORCH_CHECK(err == cudaSuccess, "magnitude_merge: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) {
  m.impl("magnitude_merge_factors", &magnitude_merge_factors_cuda);
}
