// Plain-CUDA launcher of the PS-LoRA magnitude merge (no torch headers; glue: csrc/cuda_glue/magnitude_merge.cpp).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

// Magnitude merge from factors: K ≥ 1 updates s_k·B[:, off_k:off_{k+1}]·A[off_k:off_{k+1}, :]. The task table
// (off: K+1 int64, scal: K float32) lives in device memory, so one launch takes any number of tasks and the
// strict "later wins only when larger" comparison runs over all of them (ties to the earliest task exactly;
// splitting the tasks over launches would need the running winner of every entry in an m×n buffer).
struct SkMergeArgs {
  const float* B;      // m×Rt
  const float* A;      // Rt×n
  const int64_t* off;  // device, K+1 entries
  const float* scal;   // device, K entries
  int64_t m, n, Rt, ldo, K;
  int accumulate;  // 1: out += merged, 0: out = merged
};
// out_dtype: 0 float32, 1 bfloat16, 2 float16.
cudaError_t sk_magnitude_merge(const SkMergeArgs& a, void* out, int out_dtype, cudaStream_t stream);
