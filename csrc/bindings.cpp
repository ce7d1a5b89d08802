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
  // --- sign-consistency loss and magnitude merge (PS-LoRA) ---
  // --- GORP update epilogue ---
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "slice_kernels native kernels; the ops are torch.ops.slice_kernels_C.*";
#ifdef SK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
