// The one binding file of slice_kernels._C.
//
// Python sees the native kernels as torch operators in the `slice_kernels_C` namespace
// (torch.ops.slice_kernels_C.<op>). Their schemas are declared here, once; each op's CPU kernel registers
// its implementation in csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m)) and, in CUDA
// builds, its CUDA glue in csrc/cuda_glue/<op>.cpp calls the plain-CUDA launchers of csrc/cuda/<op>.cu.
// Only light headers are included: <torch/extension.h> costs about a minute per translation unit.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(slice_kernels_C, m) {
  // --- conflict statistics / surgery / randomized SVD / gradient accumulation (SLICE init path) ---
  // prev = [] means "no replay gradients" (D = N_p = 0). Returns (L, 3) float64 rows [D, N_p, N_c].
  m.def("conflict_stats(Tensor[] cur, Tensor[] prev) -> Tensor");
  m.def("surgery_(Tensor(a!)[] cur, Tensor[] prev, Tensor gammas) -> ()");
  // Batched Cholesky of float64 Gram matrices + rel_shift·trace·I, pivots floored at rel_floor·max(diag):
  // (R upper, number of floored pivots per matrix).
  m.def("cholesky_shifted(Tensor gram, float rel_shift, float rel_floor) -> (Tensor, Tensor)");
  m.def("grad_accumulate_(Tensor(a!) acc, Tensor grad, float alpha) -> ()");
  // --- sign-consistency loss and magnitude merge (PS-LoRA) ---
  // kind: 0 = history factors (H1 = Bh m×R, H2 = Ah R×n), 1 = dense (H1 = H m×n), 2 = sign bits (H1 uint8
  // m×ceil(n/8)); mode: 0 = tanh, 1 = hinge. Returns mean_j of the L_dir summand; bwd returns (dA, dB).
  m.def("sign_loss_fwd(Tensor A, Tensor B, Tensor H1, Tensor? H2, int kind, int mode, float scaling, "
        "float alpha_l, float inv_rms) -> Tensor");
  m.def("sign_loss_bwd(Tensor grad, Tensor A, Tensor B, Tensor H1, Tensor? H2, int kind, int mode, "
        "float scaling, float alpha_l, float inv_rms) -> (Tensor, Tensor)");
  // the training path: (L_dir, dA, dB) for an upstream gradient of 1, from one pass over the tiles
  m.def("sign_loss_fwd_bwd(Tensor A, Tensor B, Tensor H1, Tensor? H2, int kind, int mode, float scaling, "
        "float alpha_l, float inv_rms) -> (Tensor, Tensor, Tensor)");
  // out (m×n) = or += the element-wise max-|·| of K updates s_k·B[:, off_k:off_k+1]·A[off_k:off_k+1, :].
  m.def("magnitude_merge_factors(Tensor B, Tensor A, int[] offsets, float[] scalings, Tensor(a!) out, "
        "bool accumulate) -> ()");
  // --- GORP update epilogue ---
  // g' = g - proj; Adam moments in place; u = (m/bc1)/(sqrt(v/bc2)+eps); out <- u; param <- decay*param - step_size*u
  m.def("gorp_update(Tensor g, Tensor? proj, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor(c!)? param, "
        "Tensor(d!)? out, float beta1, float beta2, float eps, float bc1, float bc2, float step_size, "
        "float decay) -> ()");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "slice_kernels native kernels; the ops are torch.ops.slice_kernels_C.*";
#ifdef SK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
