// CPU kernels of the SLICE conflict statistics and gradient surgery (SPEC §1 steps 3-4), multi-tensor:
// one call covers every target layer.
//
// The work is cut into fixed chunks of kChunk elements (independent of the thread count) and each chunk's
// float64 partial sums are added per layer in chunk order, so the result is bitwise reproducible whatever
// OMP_NUM_THREADS is. Loads are float32, products and sums float64: a float64 product of two float32 values
// is exact, so the only rounding is in the float64 additions (relative error ~ 1e-16 · log(chunk)).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common/conflict_checks.h"
#include "cpu/cpu_clones.h"

namespace {

constexpr int64_t kChunk = 1 << 16;

struct Item {
  int64_t layer, start, end;
};

std::vector<Item> make_items(const std::vector<int64_t>& sizes) {
  std::vector<Item> items;
  for (int64_t l = 0; l < (int64_t)sizes.size(); ++l)
    for (int64_t s = 0; s < sizes[l]; s += kChunk) items.push_back({l, s, std::min(sizes[l], s + kChunk)});
  return items;
}

void check_list(const at::TensorList cur, const at::TensorList prev, const char* op) {
  sk_checks::conflict_lists(cur, prev, op);
  TORCH_CHECK(cur[0].device().is_cpu(), op, ": the gradients must be CPU tensors, got ", cur[0].device());
}

// kLanes independent accumulators per sum let the compiler vectorize without reassociating one long chain, and
// the AVX2 copy (cpu_clones.h) fills two ymm registers per sum with them (4 lanes gave GCC nothing wider to do
// than the SSE copy). Both copies add in the same lane order: the same bits.
constexpr int kLanes = 8;

SK_CPU_CLONES void chunk_stats(const float* __restrict c, const float* __restrict p, int64_t n, double out[3]) {
  double d[kLanes] = {}, np[kLanes] = {}, nc[kLanes] = {};
  int64_t i = 0;
  if (p != nullptr) {
    for (; i + kLanes <= n; i += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const double x = c[i + k], y = p[i + k];
        d[k] += x * y;
        np[k] += y * y;
        nc[k] += x * x;
      }
    for (; i < n; ++i) {
      const double x = c[i], y = p[i];
      d[0] += x * y;
      np[0] += y * y;
      nc[0] += x * x;
    }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const double x = c[i + k];
        nc[k] += x * x;
      }
    for (; i < n; ++i) {
      const double x = c[i];
      nc[0] += x * x;
    }
  }
  // pairwise over the lanes, in a fixed order
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) {
      d[k] += d[k + w];
      np[k] += np[k + w];
      nc[k] += nc[k + w];
    }
  out[0] = d[0];
  out[1] = np[0];
  out[2] = nc[0];
}

at::Tensor conflict_stats_cpu(at::TensorList cur, at::TensorList prev) {
  check_list(cur, prev, "conflict_stats");
  const int64_t L = cur.size();
  std::vector<int64_t> sizes(L);
  for (int64_t l = 0; l < L; ++l) sizes[l] = cur[l].numel();
  const auto items = make_items(sizes);
  std::vector<double> partial(items.size() * 3, 0.0);
  std::vector<const float*> cp(L), pp(L, nullptr);
  for (int64_t l = 0; l < L; ++l) {
    cp[l] = cur[l].data_ptr<float>();
    if (!prev.empty()) pp[l] = prev[l].data_ptr<float>();
  }
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const Item& w = items[it];
      const float* p = pp[w.layer] ? pp[w.layer] + w.start : nullptr;
      chunk_stats(cp[w.layer] + w.start, p, w.end - w.start, &partial[it * 3]);
    }
  });
  at::Tensor out = at::zeros({L, 3}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t it = 0; it < items.size(); ++it)
    for (int k = 0; k < 3; ++k) o[items[it].layer * 3 + k] += partial[it * 3 + k];
  return out;
}

// c ← c + γ·p in float64, then one rounding: at most 0.5 ulp, never worse than torch's float32 add_(alpha=γ).
// The baseline copy alone ran at 0.44× torch's AVX2 add_, the AVX2 copy at 0.7–0.9× (benches/RESULTS.md).
SK_CPU_CLONES void chunk_surgery(float* c, const float* p, double gamma, int64_t n) {
  for (int64_t i = 0; i < n; ++i) c[i] = (float)((double)c[i] + gamma * (double)p[i]);
}

void surgery_cpu(at::TensorList cur, at::TensorList prev, const at::Tensor& gammas) {
  check_list(cur, prev, "surgery_");
  TORCH_CHECK(!prev.empty(), "surgery_: needs the replay gradients");
  sk_checks::surgery_gammas(gammas, (int64_t)cur.size());
  const int64_t L = cur.size();
  const at::Tensor g = gammas.contiguous();
  const double* gp = g.data_ptr<double>();
  std::vector<int64_t> sizes(L);
  for (int64_t l = 0; l < L; ++l) sizes[l] = gp[l] != 0.0 ? cur[l].numel() : 0;  // γ = 0 layers: no traffic
  const auto items = make_items(sizes);
  std::vector<float*> cp(L);
  std::vector<const float*> pp(L);
  for (int64_t l = 0; l < L; ++l) {
    cp[l] = cur[l].data_ptr<float>();
    pp[l] = prev[l].data_ptr<float>();
  }
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const Item& w = items[it];
      chunk_surgery(cp[w.layer] + w.start, pp[w.layer] + w.start, gp[w.layer], w.end - w.start);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(slice_kernels_C, CPU, m) {
  m.impl("conflict_stats", &conflict_stats_cpu);
  m.impl("surgery_", &surgery_cpu);
}
