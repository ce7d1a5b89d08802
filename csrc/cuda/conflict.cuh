#pragma once
#include "cuda/init_kernels_common.cuh"

// Per-chunk float64 partial sums [D, N_p, N_c] of `n_chunks` work items (device table), then the per-layer
// sums (layer l owns chunks first[l] .. first[l+1]-1) into out (L × 3, float64). Returns the launch error.
cudaError_t sk_conflict_stats_launch(const SkChunk* chunks, int64_t n_chunks, const int64_t* first, int64_t n_layers,
                                     bool has_prev, double* partial, double* out, cudaStream_t stream);

// In place cur += gamma[layer] * prev over the work items (γ = 0 layers are simply not in the table).
cudaError_t sk_surgery_launch(const SkChunk* chunks, const int64_t* layer_of, int64_t n_chunks, const double* gammas,
                              cudaStream_t stream);
