// Host emulation of the CUDA runtime pieces csrc/cuda/*.cu use, so tests/backends/test_cuda_emulated.py can run
// the real kernels (rewritten by tests/backends/cuda_emu/rewrite.py) on a CPU and compare them with the CPU kernels.
//
// What it emulates: a launch runs its blocks one after another; each block runs as blockDim std::threads that
// share the block's memory; __syncthreads is a std::barrier; __shfl_down_sync is a block-wide exchange (every
// caller in these kernels calls it with all threads of the block); shared memory, static and dynamic, is filled
// with NaN bytes (0xff) at the start of every block, as real shared memory holds garbage; a launch is refused with
// cudaErrorInvalidConfiguration like the real one when grid.y/z > 65535, grid.x > 2^31-1, a zero dimension,
// more than 1024 threads or more than the kernel's __launch_bounds__, or more than 48 KiB of static + dynamic
// shared memory (no kernel here opts in to more); a write past the requested dynamic shared memory is reported as
// cudaErrorIllegalAddress; a block whose threads do not all reach a __syncthreads aborts the process with the
// block named (after SK_EMU_BLOCK_TIMEOUT_S, 120 s) instead of hanging.
//
// What it cannot show: warp divergence, warp-synchronous code without __syncwarp and the GPU memory model (threads
// here are preemptive, so a race inside a block may or may not show; blocks never overlap, so a race between blocks
// never does), FMA contraction and the device's math library (tanhf, sqrt differ in the last bits), the real
// register and shared-memory budget of sm_90 (nvcc -Xptxas -v reports it), and performance. It checks the kernels'
// indexing, tiling, reductions, barriers and launch configuration, nothing else.
#pragma once
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <thread>
#include <vector>
using std::fabs;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
};
typedef void* cudaStream_t;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, gridDim, blockDim;  // blocks run one at a time: one value per running block

inline std::barrier<>* sk_bar = nullptr;
inline void __syncthreads() { sk_bar->arrive_and_wait(); }

inline cudaError_t sk_err = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = sk_err;
  sk_err = cudaSuccess;
  return e;
}

// ---- shared memory ----
constexpr size_t kSkSharedLimit = 48 * 1024;  // per block without cudaFuncSetAttribute
constexpr size_t kSkGuard = 4096;              // poisoned bytes past the dynamic allocation, checked after a block
inline std::vector<unsigned char> sk_dyn;
inline size_t sk_dyn_bytes = 0;
inline void* sk_dyn_shared() { return sk_dyn.data(); }

// Static __shared__ variables become function-local statics (private to the running block, since blocks run one
// at a time). rewrite.py follows each declaration with sk_shared_decl(site, {{&x, sizeof(x)}, ...}): the first
// thread of a block to reach it poisons the variables (the others wait on the mutex, so none reads before) and
// counts their bytes towards the block's shared-memory total.
struct SkRegion {
  void* p;
  size_t n;
};
struct SkSharedSite {
  uint64_t epoch = 0;
};
inline std::mutex sk_shared_mu;
inline uint64_t sk_block_epoch = 0;
inline size_t sk_static_bytes = 0;
inline size_t sk_max_static_bytes = 0;  // the largest per-block static total of the last launch (for tests)
inline void sk_shared_decl(SkSharedSite& site, std::initializer_list<SkRegion> regions) {
  std::lock_guard<std::mutex> lock(sk_shared_mu);
  if (site.epoch == sk_block_epoch) return;
  site.epoch = sk_block_epoch;
  for (const SkRegion& r : regions) {
    std::memset(r.p, 0xff, r.n);
    sk_static_bytes += r.n;
  }
}

// ---- launch ----
inline int sk_block_timeout_s() {  // SK_EMU_BLOCK_TIMEOUT_S overrides the 120 s a block may take
  const char* e = std::getenv("SK_EMU_BLOCK_TIMEOUT_S");
  return e != nullptr && std::atoi(e) > 0 ? std::atoi(e) : 120;
}
template <class F>
void sk_launch(unsigned max_threads, dim3 grid, dim3 block, size_t shmem, cudaStream_t, F kernel) {
  const unsigned long long nt = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nt == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || nt > 1024 || nt > max_threads || shmem > kSkSharedLimit) {
    sk_err = cudaErrorInvalidConfiguration;
    return;
  }
  gridDim = grid;
  blockDim = block;
  sk_dyn.assign(shmem + kSkGuard, 0xff);
  sk_dyn_bytes = shmem;
  sk_max_static_bytes = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        ++sk_block_epoch;
        sk_static_bytes = 0;
        std::memset(sk_dyn.data(), 0xff, sk_dyn.size());
        std::barrier<> bar(static_cast<std::ptrdiff_t>(nt));
        sk_bar = &bar;
        std::vector<std::thread> threads;
        threads.reserve(nt);
        std::mutex done_mu;
        std::condition_variable done_cv;
        unsigned long long done = 0;
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel();
            std::lock_guard<std::mutex> lock(done_mu);
            if (++done == nt) done_cv.notify_one();
          });
        {
          // A __syncthreads that not every thread reaches deadlocks here (on a GPU it hangs or is undefined):
          // abort with the block's name rather than hang the test run.
          std::unique_lock<std::mutex> lock(done_mu);
          if (!done_cv.wait_for(lock, std::chrono::seconds(sk_block_timeout_s()), [&] { return done == nt; })) {
            std::fprintf(stderr, "cuda emulator: block (%u, %u, %u) did not finish within %d s: a __syncthreads "
                                 "not reached by every thread of the block?\n", bx, by, bz, sk_block_timeout_s());
            std::fflush(stderr);
            std::abort();
          }
        }
        for (auto& th : threads) th.join();
        sk_bar = nullptr;
        if (sk_static_bytes > sk_max_static_bytes) sk_max_static_bytes = sk_static_bytes;
        if (sk_static_bytes + shmem > kSkSharedLimit) {
          sk_err = cudaErrorInvalidConfiguration;  // the real launch would have been refused
          return;
        }
        for (size_t i = shmem; i < sk_dyn.size(); ++i)
          if (sk_dyn[i] != 0xff) {
            sk_err = cudaErrorIllegalAddress;
            return;
          }
      }
}

// ---- device intrinsics ----
struct alignas(16) float4 {
  float x, y, z, w;
};
inline double sk_shfl_slots[1024];
template <class T>
inline T __shfl_down_sync(unsigned, T v, int delta) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z), lane = t & 31;
  sk_shfl_slots[t] = static_cast<double>(v);
  __syncthreads();
  const T r = lane + delta < 32 ? static_cast<T>(sk_shfl_slots[t + delta]) : v;
  __syncthreads();
  return r;
}
