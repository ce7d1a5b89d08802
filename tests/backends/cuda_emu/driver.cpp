// extern "C" entry points of the emulated CUDA kernels for tests/backends/test_cuda_emulated.py (ctypes): one
// per launcher of csrc/cuda/*.cu, taking raw pointers to CPU tensors. Each returns the launcher's cudaError_t (int).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/conflict.cuh"
#include "cuda/gorp_update.cuh"
#include "cuda/grad_accum.cuh"
#include "cuda/magnitude_merge.cuh"
#include "cuda/rsvd.cuh"
#include "cuda/sign_loss.cuh"

extern "C" {

// plan: seg_fwd, seg_dB, seg_dA, partials_fwd, partials_fwd_bwd, workspace (SkSignLossPlan's fields, in order)
void emu_sign_loss_plan(int64_t m, int64_t n, int64_t r, int sm_count, int64_t segments, int64_t* plan) {
  const SkSignLossPlan p = sk_sign_loss_plan(m, n, r, sm_count, segments);
  const int64_t v[6] = {p.seg_fwd, p.seg_dB, p.seg_dA, p.partials_fwd, p.partials_fwd_bwd, p.workspace};
  for (int i = 0; i < 6; ++i) plan[i] = v[i];
}

// which: 0 fwd, 1 bwd (grad: a float32 scalar), 2 fwd_bwd; plan as emu_sign_loss_plan writes it (a test may pass
// a wrong one: the launchers must refuse it)
int emu_sign_loss(int which, const float* A, const float* B, const float* H1, const float* H2, const uint8_t* bits,
                  int64_t m, int64_t n, int64_t r, int64_t R, int kind, int mode, float scaling, float alpha_l,
                  float inv_rms, const int64_t* plan, const float* grad, float* partial, float* dA, float* dB,
                  float* workspace) {
  SkSignLossArgs a{};
  a.A = A;
  a.B = B;
  a.H1 = H1;
  a.H2 = H2;
  a.bits = bits;
  a.m = m;
  a.n = n;
  a.r = r;
  a.R = R;
  a.kind = kind;
  a.mode = mode;
  a.scaling = scaling;
  a.alpha_l = alpha_l;
  a.inv_rms = inv_rms;
  SkSignLossPlan p{};
  p.seg_fwd = plan[0];
  p.seg_dB = plan[1];
  p.seg_dA = plan[2];
  p.partials_fwd = plan[3];
  p.partials_fwd_bwd = plan[4];
  p.workspace = plan[5];
  if (which == 0) return sk_sign_loss_fwd(a, p, partial, nullptr);
  if (which == 1) return sk_sign_loss_bwd(a, p, grad, dA, dB, workspace, nullptr);
  return sk_sign_loss_fwd_bwd(a, p, partial, dA, dB, workspace, nullptr);
}

int emu_magnitude_merge(const float* B, const float* A, const int64_t* off, const float* scal, int64_t m, int64_t n,
                        int64_t Rt, int64_t ldo, int64_t K, int accumulate, void* out, int out_dtype) {
  SkMergeArgs a{};
  a.B = B;
  a.A = A;
  a.off = off;
  a.scal = scal;
  a.m = m;
  a.n = n;
  a.Rt = Rt;
  a.ldo = ldo;
  a.K = K;
  a.accumulate = accumulate;
  return sk_magnitude_merge(a, out, out_dtype, nullptr);
}

int emu_cholesky_shifted(const double* gram, double* work, double* R, int* floored, int64_t b, int64_t q,
                         double rel_shift, double rel_floor) {
  return sk_cholesky_shifted_launch(gram, work, R, floored, b, q, rel_shift, rel_floor, nullptr);
}

int emu_conflict_stats(const SkChunk* chunks, int64_t n_chunks, const int64_t* first, int64_t n_layers, int has_prev,
                       double* partial, double* out) {
  return sk_conflict_stats_launch(chunks, n_chunks, first, n_layers, has_prev != 0, partial, out, nullptr);
}

int emu_surgery(const SkChunk* chunks, const int64_t* layer_of, int64_t n_chunks, const double* gammas) {
  return sk_surgery_launch(chunks, layer_of, n_chunks, gammas, nullptr);
}

// dtype: 0 float32, 1 float32 state with a bfloat16 parameter, 2 float64
int emu_gorp_update(int dtype, const void* g, const void* proj, void* m, void* v, void* param, void* out, int64_t n,
                    double beta1, double beta2, double eps, double bc1, double bc2, double step_size, double decay) {
  const SkGorpScalars s{beta1, beta2, eps, bc1, bc2, step_size, decay};
  if (dtype == 0)
    return sk_gorp_update_f32(static_cast<const float*>(g), static_cast<const float*>(proj), static_cast<float*>(m),
                              static_cast<float*>(v), static_cast<float*>(param), static_cast<float*>(out), n, s,
                              nullptr);
  if (dtype == 1)
    return sk_gorp_update_f32_bf16(static_cast<const float*>(g), static_cast<const float*>(proj),
                                   static_cast<float*>(m), static_cast<float*>(v),
                                   static_cast<__nv_bfloat16*>(param), static_cast<float*>(out), n, s, nullptr);
  return sk_gorp_update_f64(static_cast<const double*>(g), static_cast<const double*>(proj), static_cast<double*>(m),
                            static_cast<double*>(v), static_cast<double*>(param), static_cast<double*>(out), n, s,
                            nullptr);
}

int emu_grad_accumulate(float* acc, const void* grad, int grad_dtype, int64_t n, float alpha) {
  return sk_grad_accumulate_launch(acc, grad, grad_dtype, n, alpha, nullptr);
}

}  // extern "C"
