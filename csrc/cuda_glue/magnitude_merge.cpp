// CUDA glue of the PS-LoRA magnitude merge: checks the tensors, packs offsets and scalings into the launch
// arguments (at most SK_MERGE_MAX_TASKS tasks), calls csrc/cuda/magnitude_merge.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/magnitude_merge.cuh"

namespace {

void magnitude_merge_factors_cuda(const at::Tensor& B, const at::Tensor& A, at::IntArrayRef offsets,
                                  at::ArrayRef<double> scalings, const at::Tensor& out, bool accumulate) {
  TORCH_CHECK(B.is_cuda() && A.device() == B.device() && out.device() == B.device(),
              "magnitude_merge (cuda): B, A and out must be on one CUDA device");
  TORCH_CHECK(B.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat && B.is_contiguous() && A.is_contiguous(),
              "magnitude_merge (cuda): factors must be contiguous float32");
  TORCH_CHECK(B.dim() == 2 && A.dim() == 2 && B.size(1) == A.size(0), "magnitude_merge: B (m, ΣR), A (ΣR, n)");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == B.size(0) && out.size(1) == A.size(1) && out.stride(1) == 1,
              "magnitude_merge: out must be m×n with unit column stride");
  const int64_t K = static_cast<int64_t>(scalings.size());
  TORCH_CHECK(K >= 1 && K <= SK_MERGE_MAX_TASKS, "magnitude_merge (cuda): 1 to ", SK_MERGE_MAX_TASKS,
              " tasks per call, got ", K, "; merge in groups (the merge is associative in its winners)");
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == K + 1 && offsets.front() == 0 && offsets.back() == B.size(1),
              "magnitude_merge: offsets must be [0, ..., ΣR] with one more entry than scalings");
  SkMergeArgs a{};
  a.B = B.data_ptr<float>();
  a.A = A.data_ptr<float>();
  a.m = B.size(0);
  a.n = A.size(1);
  a.Rt = B.size(1);
  a.ldo = out.stride(0);
  a.K = static_cast<int>(K);
  for (int64_t k = 0; k <= K; ++k) a.off[k] = offsets[k];
  for (int64_t k = 0; k < K; ++k) a.scal[k] = static_cast<float>(scalings[k]);
  a.accumulate = accumulate ? 1 : 0;
  int dt;
  switch (out.scalar_type()) {
    case at::kFloat: dt = 0; break;
    case at::kBFloat16: dt = 1; break;
    case at::kHalf: dt = 2; break;
    default: TORCH_CHECK(false, "magnitude_merge (cuda): out must be float32, bfloat16 or float16");
  }
  c10::cuda::CUDAGuard guard(B.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(B.device().index()).stream();
  const cudaError_t err = sk_magnitude_merge(a, out.data_ptr(), dt, stream);
  TORCH_CHECK(err == cudaSuccess, "magnitude_merge: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) {
  m.impl("magnitude_merge_factors", &magnitude_merge_factors_cuda);
}
