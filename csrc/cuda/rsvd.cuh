#pragma once
#include <cuda_runtime.h>
#include <cstdint>

// Batched Cholesky of b float64 Gram matrices (q×q, row-major): R (upper) with RᵀR = gram + rel_shift·trace·I,
// pivots below rel_floor·max(diag) floored (row kept out of R). work: b·q·q doubles of scratch.
// floored[i]: the number of floored pivots of matrix i. Returns the launch error.
cudaError_t sk_cholesky_shifted_launch(const double* gram, double* work, double* R, int* floored, int64_t b, int64_t q,
                                       double rel_shift, double rel_floor, cudaStream_t stream);
