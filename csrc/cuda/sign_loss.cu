// PS-LoRA sign-consistency loss, plain CUDA (float32). Mirrors the Triton kernels:
// * forward: one block per (32-row block, segment) walks the segment's column tiles, forms the ΔW and H tiles
//   (shared-memory tiled products over the rank), reduces the loss summand; one partial per block
//   (deterministic: the caller adds them in a fixed order, in float64);
// * dB: one block per (row block, rank chunk, segment), dB_rows = s·Σ_tiles G·Aᵀ accumulated in shared memory
//   (on the training path it also reduces the loss, so loss + gradients take two kernels, not three);
// * dA: one block per (32-column block, rank chunk, segment), dA_cols = s·Σ_tiles Bᵀ·G accumulated in shared
//   memory;
// * both gradient kernels take the rank in chunks of RC = 256 along gridDim.y (see RC below), so no rank is
//   refused for lack of shared memory;
// G = ∂L/∂ΔW lives only in shared memory, one tile at a time: no m×n buffer, no atomics.
//
// Segments (why): with the primary blocks alone the grid is m/32 (or n/32) blocks: 128 at 4096, about one
// 256-thread block per H100 SM, and a long serial loop each. So the walked tiles are cut into
// S contiguous segments of whole tiles (sk_sign_loss_plan picks S for about 2 blocks per SM, at least 4 tiles
// per segment, S = 1 when the primary grid is already that large). The forward writes one partial per (row
// block, segment); with S > 1 each dB (dA) segment writes its own m×r (r×n) slice of a float32 workspace
// (O((m+n)·r·S), still no m×n buffer) and reduce_segments_kernel adds the slices in segment order, so results
// stay deterministic and change only by float32 reassociation; S = 1 writes dB/dA directly.
// Coalescing (why): the gradient contractions read A (dB) and B (dA) through shared memory staged 32 ranks at a
// time with loads that run along a row (they read A with a stride of n between neighbouring threads before),
// and each thread keeps four fixed accumulator entries, so the staging is the only extra barrier; the ranks of a
// warp are uniform, so a rank below 32 (r = 16) skips the padded half instead of computing masked entries.
// With S = 1 the outputs are bit for bit those of the unsplit kernels in the emulator (same summation orders).
// Shared loads (why): the scalar loops issued 1.25 shared loads per FFMA, where an H100 SM issues about 4
// warp-FFMAs per warp-LDS, so every product now reads its summed index as float4 (sign_loss_tiles.cuh):
// tile_product and the dB/dA contractions take one LDS.128 per operand row per four steps, 3.2 FFMAs per shared
// load instead of 0.8. For that each contraction's summed index runs along shared rows of KP = 36 floats: dB
// reads the staged A[k][j] and G[i][j]; dA stages B transposed (B[i][k] as [k][i]) and g_tile writes G
// transposed. The order of every sum is unchanged, so the outputs are bit for bit
// those of the scalar loops (tests/backends/test_cuda_emulated.py builds both and compares the bits).
#include "cuda/sign_loss.cuh"
#include "cuda/sign_loss_tiles.cuh"

namespace {

using namespace sk_tiles;

__device__ __forceinline__ float sgnf(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f); }

// ΔW tile into d[], H tile (±1 for bits) into h[]; entries outside the matrix are flagged by valid[].
__device__ void form_tiles(const SkSignLossArgs& a, int64_t i0, int64_t j0, float d[RPT], float h[RPT],
                           bool valid[RPT], Smem& sm) {
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  tile_product(a.B, a.r, a.A, a.n, i0, j0, a.m, a.n, a.r, d, sm);
  if (a.kind == 0) tile_product(a.H1, a.R, a.H2, a.n, i0, j0, a.m, a.n, a.R, h, sm);
  const int64_t nbytes = (a.n + 7) / 8;
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    const int64_t i = i0 + ty + 8 * q, j = j0 + tx;
    valid[q] = i < a.m && j < a.n;
    d[q] *= a.scaling;
    if (a.kind == 1) {
      h[q] = valid[q] ? a.H1[i * a.n + j] : 0.f;
    } else if (a.kind == 2) {
      h[q] = valid[q] ? (((a.bits[i * nbytes + (j >> 3)] >> (j & 7)) & 1) ? 1.f : -1.f) : 0.f;
    }
  }
}

// The loss summand f and its derivative g = ∂f/∂d of one entry, from one pair of tanhf (the training path needs
// both). summand() and derivative() below take one output each; inlined, the unused one is dead code, so one
// expression serves all three paths and they agree bit for bit.
__device__ __forceinline__ void summand_and_derivative(const SkSignLossArgs& a, float d, float h, float& f,
                                                       float& g) {
  if (a.mode == 0) {
    const float t = a.kind == 2 ? h : tanhf(a.alpha_l * h);
    const float td = tanhf(a.alpha_l * d);
    f = 1.f - td * t;
    g = -a.alpha_l * (1.f - td * td) * t;
    return;
  }
  const float sh = sgnf(h), v = -sh * d;
  f = v > 0.f ? v * a.inv_rms : 0.f;
  g = v > 0.f ? -sh * a.inv_rms : 0.f;
}

__device__ __forceinline__ float summand(const SkSignLossArgs& a, float d, float h) {
  float f, g;
  summand_and_derivative(a, d, h, f, g);
  return f;
}

__device__ __forceinline__ float derivative(const SkSignLossArgs& a, float d, float h) {
  float f, g;
  summand_and_derivative(a, d, h, f, g);
  return g;
}

// [t0, t1): the tiles of segment s of S over `tiles` tiles; contiguous, sizes differ by at most one, none empty
// when S <= tiles (sk_sign_loss_plan guarantees it).
__device__ __forceinline__ void segment_tiles(int64_t tiles, int64_t S, int64_t s, int64_t& t0, int64_t& t1) {
  t0 = s * tiles / S;
  t1 = (s + 1) * tiles / S;
}

// The loss sums run in float64 (one add per entry, beside a tanhf): a thread walks up to 4·n/32 summands of one
// row block, 1792 at n = 14336 with one segment, and a float32 running sum would lose up to that many roundings; the CPU kernel
// likewise sums at most 512 floats before going to float64.
// grid (row blocks, segments); partial[row block · segments + segment].
__global__ void __launch_bounds__(NT) fwd_kernel(SkSignLossArgs a, float* partial) {
  __shared__ Smem sm;
  __shared__ double red[NT];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  int64_t t0, t1;
  segment_tiles((a.n + BN - 1) / BN, gridDim.y, blockIdx.y, t0, t1);
  double acc = 0.0;
  for (int64_t t = t0; t < t1; ++t) {
    float d[RPT], h[RPT];
    bool valid[RPT];
    form_tiles(a, i0, t * BN, d, h, valid, sm);
#pragma unroll
    for (int q = 0; q < RPT; ++q)
      if (valid[q]) acc += summand(a, d[q], h[q]);
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = NT / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = static_cast<float>(red[0]);
}

// G tile (times gs) into sm.G, zero outside the matrix: G[row][col] for dB, transposed G[col][row] for dA (each
// contraction reads its summation index along a shared row, see contract). With want_loss, also adds this
// thread's loss summands to loss (inlined, so the accumulator stays in a register instead of a stack slot).
// The transposed store (lane tx writes G[tx][ty + 8q], banks 4·tx + const) is a 4-way bank conflict, 4 stores
// per thread per tile.
template <bool kTransposed>
__device__ __forceinline__ void g_tile(const SkSignLossArgs& a, int64_t i0, int64_t j0, float gs, Smem& sm,
                                       bool want_loss, double& loss) {
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  float d[RPT], h[RPT];
  bool valid[RPT];
  form_tiles(a, i0, j0, d, h, valid, sm);
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    float g;
    if (want_loss) {
      float f;
      summand_and_derivative(a, d[q], h[q], f, g);
      if (valid[q]) loss += f;
    } else {
      g = derivative(a, d[q], h[q]);
    }
    float& slot = kTransposed ? sm.G[tx][ty + 8 * q] : sm.G[ty + 8 * q][tx];
    slot = valid[q] ? gs * g : 0.f;
  }
  __syncthreads();
}

// The rank is split into chunks of RC: a block accumulates only its chunk of dB columns (dA rows) in shared
// memory, and blockIdx.y picks the chunk. BM·RC floats (32 KiB) beside the static tiles (13.5 KiB with the
// float4 rows of 36 floats; dB adds 2 KiB of loss reduction: 47.5 KiB, dA 45.5 KiB) stay under the 48 KiB a block
// gets without an opt-in, so any rank launches; a rank above RC re-forms the G tiles once per chunk.
// The staged A (B) sub-chunk reuses sm.L, free once g_tile has formed G, so staging costs no shared memory.
constexpr int RC = 256;
static_assert(sizeof(float) * BM * RC + sizeof(Smem) + sizeof(double) * NT <= 48 * 1024, "dB_kernel shared memory");
static_assert(sizeof(float) * RC * BN + sizeof(Smem) <= 48 * 1024, "dA_kernel shared memory");
static_assert(KC <= BM && BN <= KP && BM <= KP && RC % KC == 0,
              "staging in sm.L: A as KC rows of BN (dB), B transposed as KC rows of BM (dA)");
static_assert(NT == BN * 8 && RPT * 8 == BM && KC == BN && BM == 32 && BN == 32 && BN % 4 == 0 && BM % 4 == 0,
              "contract: a 32-wide sub-chunk in float4 steps, ranks ty + 8q, rows (columns) tx");

__device__ __forceinline__ int64_t chunk_width(int64_t r, int64_t k0) { return r - k0 < RC ? r - k0 : RC; }

// One staged sub-chunk of the gradient contractions. Thread (tx, ty) owns the accumulator entries of ranks
// kb + ty + 8q (q < NQ) and row (dB) / column (dA) tx: acc[(kb + ty + 8q)·32 + tx] += Σ_l X[ty + 8q][l]·Y[tx][l]
// over l < 32, l ascending, from a partial sum started at +0 (the order of the scalar kernels). X (the staged A,
// or B transposed) and Y (G, or G transposed) both run along l in rows of KP floats, so four steps of l take one
// broadcast LDS.128 of X per rank and one conflict-free LDS.128 of Y (see sign_loss_tiles.cuh): NQ + 1 loads for
// 4·NQ FFMAs, where the scalar loop took NQ + 1 loads for NQ. The rank is warp-uniform, so a warp whose ranks run
// past the chunk (r = 16: q = 2, 3) skips that work instead of computing masked entries.
template <int NQ>
__device__ __forceinline__ void contract(const float* X, const float* Y, float* acc, int kb, int tx, int ty) {
  float s[NQ];
#pragma unroll
  for (int q = 0; q < NQ; ++q) s[q] = 0.f;
#ifdef SK_TILES_SCALAR_ORDER
  for (int l = 0; l < 32; ++l) {
    const float y = Y[tx * KP + l];
#pragma unroll
    for (int q = 0; q < NQ; ++q) s[q] += X[(ty + 8 * q) * KP + l] * y;
  }
#else
#pragma unroll 1
  for (int l = 0; l < 32; l += 4) {
    const float4 y = lds4(Y + tx * KP + l);
#pragma unroll
    for (int q = 0; q < NQ; ++q) s[q] = dot4(s[q], lds4(X + (ty + 8 * q) * KP + l), y);
  }
#endif
#pragma unroll
  for (int q = 0; q < NQ; ++q) acc[(kb + ty + 8 * q) * 32 + tx] += s[q];
}

// contract<NQ> for the number of this warp's ranks below nk (the ranks left in the chunk)
__device__ __forceinline__ void contract_any(const float* X, const float* Y, float* acc, int kb, int nk, int tx,
                                             int ty) {
  const int left = nk - ty, nq = left <= 0 ? 0 : ((left + 7) / 8 < RPT ? (left + 7) / 8 : RPT);
  switch (nq) {
    case 4: contract<4>(X, Y, acc, kb, tx, ty); break;
    case 3: contract<3>(X, Y, acc, kb, tx, ty); break;
    case 2: contract<2>(X, Y, acc, kb, tx, ty); break;
    case 1: contract<1>(X, Y, acc, kb, tx, ty); break;
    default: break;
  }
}

// gs: ∂mean/∂ΔW brings 1/(m·n), ΔW = s·B·A one more s, times the upstream gradient (nullptr: 1).
__device__ __forceinline__ float grad_scale(const SkSignLossArgs& a, const float* grad) {
  const float g0 = grad != nullptr ? grad[0] : 1.f;
  return g0 * a.scaling / (static_cast<float>(a.m) * static_cast<float>(a.n));
}

// grid (row blocks, rank chunks, segments); dynamic shared memory: min(r, RC) × BM floats, rank-major (a warp's
// 32 rows of one rank are consecutive: no bank conflicts at any r). grad == nullptr means an upstream gradient
// of 1. out: dB (one segment) or the workspace, segment z writing out + z·m·r. kLoss (the one-pass training
// path): the chunk-0 blocks also reduce their loss sum into partial[row block · segments + segment].
// __launch_bounds__(NT, 3): left to itself ptxas (CUDA 13.0.88, sm_90, -O3) holds both variants at 64 registers
// and spills (20 B of spill stores gradient only, 36 B with the loss), and so it does at (NT, 4); 80
// registers (3 blocks per SM, as before the split) spill nothing in either.
template <bool kLoss>
__global__ void __launch_bounds__(NT, 3) dB_kernel(SkSignLossArgs a, const float* grad, float* out, float* partial) {
  __shared__ Smem sm;
  __shared__ double red[NT];
  extern __shared__ float accB[];
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC, rc = chunk_width(a.r, k0);
  const int rcn = static_cast<int>(rc);  // <= RC: int arithmetic in the contraction
  const bool want_loss = kLoss && blockIdx.y == 0;  // block-uniform
  const float gs = grad_scale(a, grad);
  int64_t t0, t1;
  segment_tiles((a.n + BN - 1) / BN, gridDim.z, blockIdx.z, t0, t1);
  out += static_cast<int64_t>(blockIdx.z) * a.m * a.r;
  double lacc = 0.0;
  for (int64_t e = threadIdx.x; e < BM * rc; e += NT) accB[e] = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * BN;
    g_tile<false>(a, i0, j0, gs, sm, want_loss, lacc);
    for (int kb = 0; kb < rcn; kb += KC) {
      // A[k0+kb+kk][j0+jj] into sm.L[kk][jj]: a warp reads 32 consecutive floats of one row of A
      const float* Ab = a.A + (k0 + kb) * a.n + j0;
      const int ncol = a.n - j0 < BN ? static_cast<int>(a.n - j0) : BN, nk = rcn - kb;
      for (int e = threadIdx.x; e < KC * BN; e += NT) {
        const int kk = e / BN, jj = e % BN;
        sm.L[kk][jj] = (kk < nk && jj < ncol) ? Ab[kk * a.n + jj] : 0.f;
      }
      __syncthreads();
      // entry (rank kb + ty + 8q, row tx) += Σ_jj A[k][jj]·G[tx][jj]: the jj order of a plain row·row dot (the
      // old kernel's), zeros past n add nothing
      contract_any(&sm.L[0][0], &sm.G[0][0], accB, kb, nk, tx, ty);
      __syncthreads();
    }
  }
  for (int64_t e = threadIdx.x; e < BM * rc; e += NT) {  // accB is rank-major (k, row): see contract
    const int64_t i = i0 + e / rc;
    if (i < a.m) out[i * a.r + k0 + e % rc] = accB[(e % rc) * BM + e / rc];
  }
  if (want_loss) {
    red[threadIdx.x] = lacc;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0)
      partial[static_cast<int64_t>(blockIdx.x) * gridDim.z + blockIdx.z] = static_cast<float>(red[0]);
  }
}

// grid (column blocks, rank chunks, segments); dynamic shared memory: min(r, RC) × BN floats. out: dA (one
// segment) or the workspace, segment z writing out + z·r·n.
__global__ void __launch_bounds__(NT) dA_kernel(SkSignLossArgs a, const float* grad, float* out) {
  __shared__ Smem sm;
  extern __shared__ float accA[];
  const int tx = threadIdx.x % BN, ty = threadIdx.x / BN;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC, rc = chunk_width(a.r, k0);
  const int rcn = static_cast<int>(rc);  // <= RC: int arithmetic in the contraction
  const float gs = grad_scale(a, grad);
  int64_t t0, t1;
  segment_tiles((a.m + BM - 1) / BM, gridDim.z, blockIdx.z, t0, t1);
  out += static_cast<int64_t>(blockIdx.z) * a.r * a.n;
  double unused = 0.0;
  for (int64_t e = threadIdx.x; e < rc * BN; e += NT) accA[e] = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i0 = t * BM;
    g_tile<true>(a, i0, j0, gs, sm, false, unused);  // sm.G[col][row]
    for (int kb = 0; kb < rcn; kb += KC) {
      // B[i0+ii][k0+kb+kk] into sm.L[kk][ii] (transposed): a warp reads 32 consecutive floats of one row of B;
      // lane kk's store to row kk is the 4-way bank conflict of a transposed staging (sign_loss_tiles.cuh)
      const float* Bb = a.B + i0 * a.r + k0 + kb;
      const int nrow = a.m - i0 < BM ? static_cast<int>(a.m - i0) : BM, nk = rcn - kb;
      for (int e = threadIdx.x; e < BM * KC; e += NT) {
        const int ii = e / KC, kk = e % KC;
        sm.L[kk][ii] = (ii < nrow && kk < nk) ? Bb[ii * a.r + kk] : 0.f;
      }
      __syncthreads();
      // entry (rank kb + ty + 8q, column tx) += Σ_ii B[ii][k]·G[ii][tx] in ascending ii (the scalar loop's order), zeros
      // past m add nothing
      contract_any(&sm.L[0][0], &sm.G[0][0], accA, kb, nk, tx, ty);
      __syncthreads();
    }
  }
  for (int64_t e = threadIdx.x; e < rc * BN; e += NT) {
    const int64_t j = j0 + e % BN;
    if (j < a.n) out[(k0 + e / BN) * a.n + j] = accA[e];
  }
}

// out[e] = Σ_z ws[z·N + e], z in order: the deterministic sum over segments.
__global__ void __launch_bounds__(NT) reduce_segments_kernel(const float* ws, int64_t S, int64_t N, float* out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * NT + threadIdx.x; e < N; e += static_cast<int64_t>(gridDim.x) * NT) {
    float s = ws[e];
    for (int64_t z = 1; z < S; ++z) s += ws[z * N + e];
    out[e] = s;
  }
}

cudaError_t reduce_segments(const float* ws, int64_t S, int64_t N, float* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int64_t want = (N + NT - 1) / NT, blocks = want < 65535 ? want : 65535;  // grid-stride past that
  reduce_segments_kernel<<<static_cast<unsigned>(blocks), NT, 0, stream>>>(ws, S, N, out);
  return cudaGetLastError();
}

// A segment pays a fixed cost beside its tiles (zeroing and writing its accumulators, its workspace slice and
// share of the reduction, its loss reduction): at least 4 tiles amortize it.
constexpr int64_t kMinTilesPerSegment = 4;
constexpr int64_t kMaxGridYZ = 65535;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t rank_chunks(int64_t r) { return r > RC ? cdiv(r, RC) : 1; }  // r = 0 still takes one (the loss blocks)

// S for `primary` blocks that each walk `tiles` tiles; see sk_sign_loss_plan.
int64_t choose_segments(int64_t primary, int64_t tiles, int sm_count, int64_t forced) {
  int64_t S;
  if (forced > 0) {
    S = forced;
  } else {
    const int64_t target = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
    S = (primary == 0 || primary >= target) ? 1 : cdiv(target, primary);
    if (S > tiles / kMinTilesPerSegment) S = tiles / kMinTilesPerSegment;
  }
  if (S > tiles) S = tiles;
  if (S > kMaxGridYZ) S = kMaxGridYZ;
  return S < 1 ? 1 : S;
}

SkSignLossPlan plan_with(int64_t m, int64_t n, int64_t r, int64_t seg_fwd, int64_t seg_dB, int64_t seg_dA) {
  SkSignLossPlan p{};
  p.seg_fwd = seg_fwd;
  p.seg_dB = seg_dB;
  p.seg_dA = seg_dA;
  p.partials_fwd = cdiv(m, BM) * seg_fwd;
  p.partials_fwd_bwd = cdiv(m, BM) * seg_dB;
  p.workspace = (seg_dB > 1 ? seg_dB * m * r : 0) + (seg_dA > 1 ? seg_dA * r * n : 0);
  return p;
}

// A plan made for other sizes would index past the buffers: refuse it.
bool plan_fits(const SkSignLossArgs& a, const SkSignLossPlan& p) {
  const int64_t tn = cdiv(a.n, BN), tm = cdiv(a.m, BM);
  auto ok = [](int64_t S, int64_t tiles) { return S >= 1 && S <= kMaxGridYZ && S <= (tiles > 1 ? tiles : 1); };
  if (!ok(p.seg_fwd, tn) || !ok(p.seg_dB, tn) || !ok(p.seg_dA, tm)) return false;
  const SkSignLossPlan q = plan_with(a.m, a.n, a.r, p.seg_fwd, p.seg_dB, p.seg_dA);
  return q.partials_fwd == p.partials_fwd && q.partials_fwd_bwd == p.partials_fwd_bwd && q.workspace == p.workspace;
}

}  // namespace

SkSignLossPlan sk_sign_loss_plan(int64_t m, int64_t n, int64_t r, int sm_count, int64_t segments) {
  const int64_t nbr = cdiv(m, BM), nbc = cdiv(n, BN), tn = nbc, tm = nbr, nchunk = rank_chunks(r);
  return plan_with(m, n, r, choose_segments(nbr, tn, sm_count, segments),
                   choose_segments(nbr * nchunk, tn, sm_count, segments),
                   choose_segments(nbc * nchunk, tm, sm_count, segments));
}

cudaError_t sk_sign_loss_fwd(const SkSignLossArgs& a, const SkSignLossPlan& p, float* partial, cudaStream_t stream) {
  if (!plan_fits(a, p)) return cudaErrorInvalidValue;
  const int64_t nb = cdiv(a.m, BM);
  if (nb == 0) return cudaSuccess;
  if (nb > 0x7fffffff) return cudaErrorInvalidConfiguration;
  fwd_kernel<<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(p.seg_fwd)), NT, 0, stream>>>(a, partial);
  return cudaGetLastError();
}

static cudaError_t launch_grads(const SkSignLossArgs& a, const SkSignLossPlan& p, const float* grad, float* dA,
                                float* dB, float* partial, float* workspace, cudaStream_t stream);

cudaError_t sk_sign_loss_bwd(const SkSignLossArgs& a, const SkSignLossPlan& p, const float* grad, float* dA,
                             float* dB, float* workspace, cudaStream_t stream) {
  return launch_grads(a, p, grad, dA, dB, nullptr, workspace, stream);
}

cudaError_t sk_sign_loss_fwd_bwd(const SkSignLossArgs& a, const SkSignLossPlan& p, float* partial, float* dA,
                                 float* dB, float* workspace, cudaStream_t stream) {
  return launch_grads(a, p, nullptr, dA, dB, partial, workspace, stream);
}

static cudaError_t launch_grads(const SkSignLossArgs& a, const SkSignLossPlan& p, const float* grad, float* dA,
                                float* dB, float* partial, float* workspace, cudaStream_t stream) {
  if (!plan_fits(a, p) || (p.workspace > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  const int64_t nbr = cdiv(a.m, BM), nbc = cdiv(a.n, BN), nchunk = rank_chunks(a.r);
  if (nchunk > kMaxGridYZ || nbr > 0x7fffffff || nbc > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t rc = a.r < RC ? a.r : RC;
  const size_t shB = sizeof(float) * BM * rc, shA = sizeof(float) * rc * BN;
  // workspace: [seg_dB slices of m×r][seg_dA slices of r×n], each part present only when split
  float* outB = p.seg_dB > 1 ? workspace : dB;
  float* outA = p.seg_dA > 1 ? workspace + (p.seg_dB > 1 ? p.seg_dB * a.m * a.r : 0) : dA;
  if (nbr > 0) {
    const dim3 grid(static_cast<unsigned>(nbr), static_cast<unsigned>(nchunk), static_cast<unsigned>(p.seg_dB));
    if (partial != nullptr) dB_kernel<true><<<grid, NT, shB, stream>>>(a, grad, outB, partial);
    else dB_kernel<false><<<grid, NT, shB, stream>>>(a, grad, outB, nullptr);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (p.seg_dB > 1 && (err = reduce_segments(outB, p.seg_dB, a.m * a.r, dB, stream)) != cudaSuccess) return err;
  }
  if (nbc > 0) {
    dA_kernel<<<dim3(static_cast<unsigned>(nbc), static_cast<unsigned>(nchunk), static_cast<unsigned>(p.seg_dA)), NT,
                shA, stream>>>(a, grad, outA);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (p.seg_dA > 1 && (err = reduce_segments(outA, p.seg_dA, a.r * a.n, dA, stream)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}
