// Helpers shared by the CUDA glue of the SLICE init-path kernels (conflict, rsvd, grad_accum) and of the
// magnitude merge (its task table).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <vector>

namespace sk_glue {

// A device copy of a small host table (work items, per-layer offsets); the copy is stream-ordered and
// the pageable source is staged before cudaMemcpyAsync returns, so the host vector may die afterwards.
template <typename T>
at::Tensor to_device(const std::vector<T>& host, const at::Device& dev, cudaStream_t stream) {
  const int64_t bytes = (int64_t)(host.size() * sizeof(T));
  at::Tensor t = at::empty({bytes > 0 ? bytes : 1}, at::TensorOptions().dtype(at::kByte).device(dev));
  if (bytes > 0) C10_CUDA_CHECK(cudaMemcpyAsync(t.data_ptr(), host.data(), bytes, cudaMemcpyHostToDevice, stream));
  return t;
}

}  // namespace sk_glue
