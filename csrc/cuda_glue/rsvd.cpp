// CUDA glue of the batched floored Cholesky of the fast randomized SVD (csrc/cuda/rsvd.cu).
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/rsvd.cuh"
#include "cuda_glue/init_kernels_glue.h"

namespace {

std::tuple<at::Tensor, at::Tensor> cholesky_shifted_cuda(const at::Tensor& gram_in, double rel_shift, double rel_floor) {
  TORCH_CHECK(gram_in.is_cuda() && gram_in.dim() == 3 && gram_in.size(1) == gram_in.size(2) &&
                  gram_in.scalar_type() == at::kDouble,
              "cholesky_shifted: expected a float64 CUDA batch of square Gram matrices (b, q, q)");
  const c10::cuda::CUDAGuard guard(gram_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gram = gram_in.contiguous();
  const int64_t b = gram.size(0), q = gram.size(1);
  const auto opts = gram.options();
  at::Tensor R = at::empty({b, q, q}, opts);
  at::Tensor work = at::empty({b, q, q}, opts);
  // zeros, not empty: with q = 0 the kernel is not launched and the count must read 0, as on the CPU
  at::Tensor floored = at::zeros({b}, opts.dtype(at::kInt));
  C10_CUDA_CHECK(sk_cholesky_shifted_launch(gram.data_ptr<double>(), work.data_ptr<double>(), R.data_ptr<double>(),
                                            floored.data_ptr<int>(), b, q, rel_shift, rel_floor, stream));
  return {R, floored};
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) { m.impl("cholesky_shifted", &cholesky_shifted_cuda); }
