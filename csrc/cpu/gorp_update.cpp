// GORP step epilogue on CPU: g' = g - proj, Adam moments, bias-corrected update u, then
// out <- u and/or param <- decay*param - step_size*u, in one pass (see slice_kernels/ops/gorp_update.py).
// State tensors (g, proj, moments, out) share float32 or float64; param has that dtype or is bfloat16 with
// float32 state (upcast, update in float32, round once on store).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "common/gorp_update_checks.h"
#include "cpu/cpu_clones.h"

namespace {

// The per-element work, specialized on which optional arrays exist so no loop has a branch. One loop, and it
// must vectorize: the step is compute-bound on CPU (three divisions and a square root per element), so it has
// an AVX2 copy beside the baseline SSE one (cpu_clones.h; both round alike, no fma). std::sqrt vectorizes only
// without errno: setup.py builds with -fno-math-errno (a `#pragma GCC optimize` did not reach the AVX2 clone);
// with errno it stayed a scalar call in a loop of its own, and the kernel ran at the speed of torch's in-place
// reference on 32k elements.
template <typename T, typename P, bool HAS_PROJ, bool HAS_OUT, bool HAS_PARAM>
SK_CPU_CLONES void gorp_update_span(const T* __restrict__ gp, const T* __restrict__ pr, T* __restrict__ mp,
                                    T* __restrict__ vp, P* __restrict__ pp, T* __restrict__ op, int64_t begin,
                                    int64_t end, T b1, T omb1, T b2, T omb2, T e, T c1, T c2, T ss, T dc) {
  for (int64_t i = begin; i < end; ++i) {
    T x = gp[i];
    if constexpr (HAS_PROJ) x -= pr[i];
    const T mi = b1 * mp[i] + omb1 * x;
    const T vi = b2 * vp[i] + omb2 * x * x;
    mp[i] = mi;
    vp[i] = vi;
    const T u = (mi / c1) / (std::sqrt(vi / c2) + e);
    if constexpr (HAS_OUT) op[i] = u;
    if constexpr (HAS_PARAM) pp[i] = static_cast<P>(dc * static_cast<T>(pp[i]) - ss * u);
  }
}

template <typename T, typename P, bool HAS_PROJ, bool HAS_OUT, bool HAS_PARAM>
void run(const T* gp, const T* pr, T* mp, T* vp, P* pp, T* op, int64_t n, double beta1, double beta2, double eps,
         double bc1, double bc2, double step_size, double decay) {
  // 1 - beta in double, then rounded: 1 - 0.999f in float32 is off by 5e-5 relative.
  const T b1 = static_cast<T>(beta1), omb1 = static_cast<T>(1.0 - beta1);
  const T b2 = static_cast<T>(beta2), omb2 = static_cast<T>(1.0 - beta2);
  const T e = static_cast<T>(eps), c1 = static_cast<T>(bc1), c2 = static_cast<T>(bc2);
  const T ss = static_cast<T>(step_size), dc = static_cast<T>(decay);
  // 256k elements per task: a projected gradient (m·r) is usually below that and then runs in the calling
  // thread; forking OpenMP for ~0.1 ms of memory-bound work costs more than it saves (measured: 65k elements
  // in 2 chunks took 5 ms on a loaded 2-core machine, against 1 ms serial).
  at::parallel_for(0, n, 1 << 18, [&](int64_t begin, int64_t end) {
    gorp_update_span<T, P, HAS_PROJ, HAS_OUT, HAS_PARAM>(gp, pr, mp, vp, pp, op, begin, end, b1, omb1, b2, omb2, e,
                                                         c1, c2, ss, dc);
  });
}

template <typename T, typename P>
void gorp_update_cpu_impl(const at::Tensor& g, const std::optional<at::Tensor>& proj, at::Tensor& m, at::Tensor& v,
                          const std::optional<at::Tensor>& param, const std::optional<at::Tensor>& out, double beta1,
                          double beta2, double eps, double bc1, double bc2, double step_size, double decay) {
  const T* gp = g.data_ptr<T>();
  const T* pr = proj ? proj->data_ptr<T>() : nullptr;
  T* mp = m.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  P* pp = param ? param->data_ptr<P>() : nullptr;
  T* op = out ? out->data_ptr<T>() : nullptr;
  const int64_t n = g.numel();
  const int code = (pr ? 4 : 0) | (op ? 2 : 0) | (pp ? 1 : 0);
#define SK_GORP_CASE(C, A, B, D)                                                                            \
  case C:                                                                                                  \
    run<T, P, A, B, D>(gp, pr, mp, vp, pp, op, n, beta1, beta2, eps, bc1, bc2, step_size, decay);          \
    break;
  switch (code) {
    SK_GORP_CASE(1, false, false, true)
    SK_GORP_CASE(2, false, true, false)
    SK_GORP_CASE(3, false, true, true)
    SK_GORP_CASE(5, true, false, true)
    SK_GORP_CASE(6, true, true, false)
    SK_GORP_CASE(7, true, true, true)
    default:
      TORCH_CHECK(false, "gorp_update: give param and/or out");
  }
#undef SK_GORP_CASE
}

void gorp_update_cpu(const at::Tensor& g, const std::optional<at::Tensor>& proj, at::Tensor exp_avg,
                     at::Tensor exp_avg_sq, const std::optional<at::Tensor>& param,
                     const std::optional<at::Tensor>& out, double beta1, double beta2, double eps, double bc1,
                     double bc2, double step_size, double decay) {
  const sk_checks::GorpTypes types = sk_checks::gorp_update_operands(g, proj, exp_avg, exp_avg_sq, param, out);
  TORCH_CHECK(g.device().is_cpu(), "gorp_update (cpp): the gradient must be a CPU tensor, got ", g.device());
  switch (types) {
    case sk_checks::GorpTypes::F32:
      gorp_update_cpu_impl<float, float>(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2,
                                         step_size, decay);
      break;
    case sk_checks::GorpTypes::F32_BF16_PARAM:
      gorp_update_cpu_impl<float, c10::BFloat16>(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1,
                                                 bc2, step_size, decay);
      break;
    case sk_checks::GorpTypes::F64:
      gorp_update_cpu_impl<double, double>(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2,
                                           step_size, decay);
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) { m.impl("gorp_update", &gorp_update_cpu); }
