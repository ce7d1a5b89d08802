// Argument checks of the multi-tensor conflict statistics and surgery shared by the CPU kernels
// (csrc/cpu/conflict.cpp) and the CUDA glue (csrc/cuda_glue/conflict.cpp). Both read every layer through a raw
// float32 pointer, so both need contiguous float32 tensors on one device with matching element counts; the
// device type (CPU or CUDA) of cur[0] is each side's own check.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace sk_checks {

inline void conflict_lists(at::TensorList cur, at::TensorList prev, const char* op) {
  TORCH_CHECK(cur.size() > 0, op, ": needs at least one layer");
  TORCH_CHECK(prev.empty() || prev.size() == cur.size(), op, ": ", prev.size(), " replay tensors for ", cur.size(),
              " current ones");
  for (size_t i = 0; i < cur.size(); ++i) {
    TORCH_CHECK(cur[i].scalar_type() == at::kFloat && cur[i].is_contiguous() && cur[i].device() == cur[0].device(),
                op, ": tensor ", i, " of cur must be a contiguous float32 tensor on ", cur[0].device(), "; got ",
                cur[i].scalar_type(), " on ", cur[i].device(), " (slice_kernels.ops.conflict converts)");
    if (!prev.empty()) {
      TORCH_CHECK(prev[i].scalar_type() == at::kFloat && prev[i].is_contiguous() &&
                      prev[i].device() == cur[0].device(),
                  op, ": tensor ", i, " of prev must be a contiguous float32 tensor on ", cur[0].device(), "; got ",
                  prev[i].scalar_type(), " on ", prev[i].device());
      TORCH_CHECK(prev[i].numel() == cur[i].numel(), op, ": tensor ", i, " has ", cur[i].numel(),
                  " elements in cur but ", prev[i].numel(), " in prev");
    }
  }
}

// surgery_ reads one γ per layer on the host to skip γ = 0 layers without a device round trip.
inline void surgery_gammas(const at::Tensor& gammas, int64_t n_layers) {
  TORCH_CHECK(gammas.device().is_cpu() && gammas.scalar_type() == at::kDouble && gammas.numel() == n_layers,
              "surgery_: gammas must be a float64 CPU tensor with one value per layer (", n_layers, "); got ",
              gammas.numel(), " ", gammas.scalar_type(), " values on ", gammas.device());
}

}  // namespace sk_checks
