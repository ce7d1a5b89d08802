// CUDA glue of the conflict statistics and surgery: builds the multi-tensor chunk table on the host, copies
// it to the device and calls the plain-CUDA launchers of csrc/cuda/conflict.cu on the current stream.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/conflict_checks.h"
#include "cuda/conflict.cuh"
#include "cuda_glue/init_kernels_glue.h"

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per block: 256 KiB of float32 per operand

void check(at::TensorList cur, at::TensorList prev, const char* op) {
  sk_checks::conflict_lists(cur, prev, op);
  TORCH_CHECK(cur[0].is_cuda(), op, ": the gradients must be CUDA tensors, got ", cur[0].device());
}

at::Tensor conflict_stats_cuda(at::TensorList cur, at::TensorList prev) {
  check(cur, prev, "conflict_stats");
  const c10::cuda::CUDAGuard guard(cur[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t L = cur.size();
  std::vector<SkChunk> chunks;
  std::vector<int64_t> first;
  for (int64_t l = 0; l < L; ++l) {
    first.push_back((int64_t)chunks.size());
    const int64_t n = cur[l].numel();
    const int64_t c = (int64_t)cur[l].data_ptr();
    const int64_t p = prev.empty() ? 0 : (int64_t)prev[l].data_ptr();
    for (int64_t s = 0; s < n; s += kChunk) chunks.push_back({c, p, s, std::min(n, s + kChunk)});
  }
  first.push_back((int64_t)chunks.size());
  const auto dev = cur[0].device();
  at::Tensor tab = sk_glue::to_device(chunks, dev, stream);
  at::Tensor fst = sk_glue::to_device(first, dev, stream);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);
  at::Tensor partial = at::empty({std::max<int64_t>((int64_t)chunks.size(), 1), 3}, f64);
  at::Tensor out = at::empty({L, 3}, f64);
  C10_CUDA_CHECK(sk_conflict_stats_launch(reinterpret_cast<const SkChunk*>(tab.data_ptr()), (int64_t)chunks.size(),
                                          reinterpret_cast<const int64_t*>(fst.data_ptr()), L, !prev.empty(),
                                          partial.data_ptr<double>(), out.data_ptr<double>(), stream));
  return out;
}

void surgery_cuda(at::TensorList cur, at::TensorList prev, const at::Tensor& gammas) {
  check(cur, prev, "surgery_");
  TORCH_CHECK(!prev.empty(), "surgery_: needs the replay gradients");
  sk_checks::surgery_gammas(gammas, (int64_t)cur.size());
  const c10::cuda::CUDAGuard guard(cur[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = gammas.contiguous();
  const double* gp = g.data_ptr<double>();
  std::vector<SkChunk> chunks;
  std::vector<int64_t> layer_of;
  std::vector<double> gam(gp, gp + cur.size());
  for (int64_t l = 0; l < (int64_t)cur.size(); ++l) {
    if (gp[l] == 0.0) continue;  // γ = 0: no traffic at all
    const int64_t n = cur[l].numel();
    for (int64_t s = 0; s < n; s += kChunk) {
      chunks.push_back({(int64_t)cur[l].data_ptr(), (int64_t)prev[l].data_ptr(), s, std::min(n, s + kChunk)});
      layer_of.push_back(l);
    }
  }
  if (chunks.empty()) return;
  const auto dev = cur[0].device();
  at::Tensor tab = sk_glue::to_device(chunks, dev, stream);
  at::Tensor lay = sk_glue::to_device(layer_of, dev, stream);
  at::Tensor gd = sk_glue::to_device(gam, dev, stream);
  C10_CUDA_CHECK(sk_surgery_launch(reinterpret_cast<const SkChunk*>(tab.data_ptr()),
                                   reinterpret_cast<const int64_t*>(lay.data_ptr()), (int64_t)chunks.size(),
                                   reinterpret_cast<const double*>(gd.data_ptr()), stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CUDA, m) {
  m.impl("conflict_stats", &conflict_stats_cuda);
  m.impl("surgery_", &surgery_cuda);
}
