// Shared declarations of the SLICE init-path CUDA kernels (conflict statistics, surgery, gradient
// accumulation, batched Cholesky of the randomized SVD). Plain CUDA, no torch headers, so nvcc alone
// compile-checks the .cu files (.ci/nvcc_check.sh); the torch glue lives in csrc/cuda_glue/.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

// One row of a multi-tensor work table: a chunk [start, end) of one layer's current (and replay) gradient.
struct SkChunk {
  int64_t cur;    // address of the layer's float32 current gradient
  int64_t prev;   // address of its float32 replay gradient (0 when there is none)
  int64_t start;  // first element of the chunk
  int64_t end;    // one past its last element
};
