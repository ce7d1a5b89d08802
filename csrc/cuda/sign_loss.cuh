// Plain-CUDA launchers of the PS-LoRA sign-consistency loss (no torch headers, so nvcc
// alone compile-checks them). The CUDA glue in csrc/cuda_glue/sign_loss.cpp wraps tensors and calls these.
// Algorithm: slice_kernels/ops/_sign_loss_triton.py, mirrored tile for tile (32×32 tiles, float32).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

struct SkSignLossArgs {
  const float* A;        // r×n, row-major
  const float* B;        // m×r
  const float* H1;       // kind 0: Bh m×R; kind 1: H m×n; unused for kind 2
  const float* H2;       // kind 0: Ah R×n
  const uint8_t* bits;   // kind 2: m × ceil(n/8), bit j%8 of byte j/8 = (H >= 0)
  int64_t m, n, r, R;
  int kind;              // 0 factors, 1 dense, 2 bits
  int mode;              // 0 tanh, 1 hinge
  float scaling, alpha_l, inv_rms;
};

// Number of float partial sums sign_loss_fwd writes (one per 32-row block); the caller sums them, in order.
int64_t sk_sign_loss_num_partials(int64_t m);
// partial[b] = Σ over row block b of the L_dir summand (not yet divided by m·n).
cudaError_t sk_sign_loss_fwd(const SkSignLossArgs& a, float* partial, cudaStream_t stream);
// dA (r×n) and dB (m×r) = gradients of mean(summand) times *grad (a device scalar); fully overwritten.
cudaError_t sk_sign_loss_bwd(const SkSignLossArgs& a, const float* grad, float* dA, float* dB, cudaStream_t stream);
// The training path: partial[b] as in sk_sign_loss_fwd plus dA, dB for an upstream gradient of 1, in two kernels.
cudaError_t sk_sign_loss_fwd_bwd(const SkSignLossArgs& a, float* partial, float* dA, float* dB, cudaStream_t stream);
