// Plain-CUDA launcher of the PS-LoRA magnitude merge (no torch headers; glue: csrc/cuda_glue/magnitude_merge.cpp).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

// Magnitude merge from factors: K ≤ SK_MERGE_MAX_TASKS updates s_k·B[:, off_k:off_{k+1}]·A[off_k:off_{k+1}, :].
#define SK_MERGE_MAX_TASKS 64
struct SkMergeArgs {
  const float* B;  // m×Rt
  const float* A;  // Rt×n
  int64_t m, n, Rt, ldo;
  int K;
  int64_t off[SK_MERGE_MAX_TASKS + 1];
  float scal[SK_MERGE_MAX_TASKS];
  int accumulate;  // 1: out += merged, 0: out = merged
};
// out_dtype: 0 float32, 1 bfloat16, 2 float16.
cudaError_t sk_magnitude_merge(const SkMergeArgs& a, void* out, int out_dtype, cudaStream_t stream);
