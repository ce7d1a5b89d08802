// Kernels that break the launch rules on purpose, rewritten and run like csrc/cuda/*.cu, so the tests can show the
// emulator refuses what a GPU would refuse (tests/backends/test_cuda_emulated.py::test_emulator_refuses_bad_launches).
#include <cuda_runtime.h>

namespace {

__global__ void __launch_bounds__(128) bounded_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = static_cast<int>(blockDim.x);
}

// 40 KiB of static shared memory: with more than 8 KiB of dynamic shared memory the block exceeds 48 KiB.
__global__ void static_shared_kernel(int* out) {
  __shared__ float big[10240];
  extern __shared__ float dyn[];
  big[threadIdx.x] = 1.f;
  dyn[0] = 0.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = static_cast<int>(big[0]);
}

// writes n floats of dynamic shared memory, wherever the launch asked for fewer
__global__ void dynamic_kernel(int n, int* out) {
  extern __shared__ float dyn[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) dyn[i] = 0.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = n;
}

}  // namespace

// which: 0 bounded_kernel, 1 static_shared_kernel, 2 dynamic_kernel(n)
extern "C" int emu_probe(int which, unsigned gx, unsigned gy, unsigned threads, size_t shmem, int n, int* out) {
  if (which == 0) bounded_kernel<<<dim3(gx, gy), threads, shmem>>>(out);
  else if (which == 1) static_shared_kernel<<<dim3(gx, gy), threads, shmem>>>(out);
  else dynamic_kernel<<<dim3(gx, gy), threads, shmem>>>(n, out);
  return cudaGetLastError();
}
