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

// How the walked dimension of each kernel is split into segments of whole tiles (one block per segment, see
// the header of sign_loss.cu), and the buffers that split needs. Made by sk_sign_loss_plan only.
struct SkSignLossPlan {
  int64_t seg_fwd;           // segments of the column tiles a forward row block walks (gridDim.y)
  int64_t seg_dB;            // segments of the column tiles a dB row block walks (gridDim.z)
  int64_t seg_dA;            // segments of the row tiles a dA column block walks (gridDim.z)
  int64_t partials_fwd;      // floats sk_sign_loss_fwd writes: row blocks × seg_fwd
  int64_t partials_fwd_bwd;  // floats sk_sign_loss_fwd_bwd writes: row blocks × seg_dB
  int64_t workspace;         // floats of workspace bwd / fwd_bwd need: seg_dB·m·r if seg_dB > 1, plus
                             // seg_dA·r·n if seg_dA > 1 (0 when nothing is split)
};

// sm_count: the device's multiprocessor count (cudaDevAttrMultiProcessorCount). segments = 0 chooses the split
// automatically (about 2 blocks per SM, at least 4 tiles per segment); segments > 0 forces S = segments in every
// kernel (for tests), clamped to the kernel's tile count and to 65535. A pure host function.
SkSignLossPlan sk_sign_loss_plan(int64_t m, int64_t n, int64_t r, int sm_count, int64_t segments);
// partial[0 .. plan.partials_fwd): Σ over one (row block, segment) of the L_dir summand (not yet divided by m·n);
// the caller adds them all, in a fixed order.
cudaError_t sk_sign_loss_fwd(const SkSignLossArgs& a, const SkSignLossPlan& p, float* partial, cudaStream_t stream);
// dA (r×n) and dB (m×r) = gradients of mean(summand) times *grad (a device scalar); fully overwritten. workspace:
// plan.workspace floats of scratch (nullptr when that is 0).
cudaError_t sk_sign_loss_bwd(const SkSignLossArgs& a, const SkSignLossPlan& p, const float* grad, float* dA,
                             float* dB, float* workspace, cudaStream_t stream);
// The training path: plan.partials_fwd_bwd partials as in sk_sign_loss_fwd plus dA, dB for an upstream gradient
// of 1, in two kernels (plus one reduction per split gradient).
cudaError_t sk_sign_loss_fwd_bwd(const SkSignLossArgs& a, const SkSignLossPlan& p, float* partial, float* dA,
                                 float* dB, float* workspace, cudaStream_t stream);
