// C++ CPU backend of the Gumbel-softmax family: gumbel_noise, gumbel_softmax_fwd, gumbel_softmax_bwd,
// gumbel_argmax (schemas and conventions in csrc/ops.cpp, semantics in DESIGN section 3).
//
// Math. With g the Gumbel noise of the element numbers (DESIGN section 3) and z = (x + g) / tau:
//   forward   y = softmax(z) along dim: y_k = e_k / s, e_k = exp(z_k - m), m = max_k z_k, s = sum_k e_k
//             hard: the one-hot of argmax_k (x + g) (torch.argmax rules: first index, NaN wins)
//   backward  dx_k = (1/tau) * y_k * (dy_k - sum_j dy_j y_j) = (1/tau) * e_k/s * (dy_k - t/s),
//             t = sum_j dy_j e_j. Nothing is saved from the forward: g, m and s are recomputed from the
//             logits and the seed (Philox is cheap next to a round trip of a saved tensor through DRAM).
//
// Work split. The logits are seen as [outer, K, inner] around dim (reduction_view). One task of
// at::parallel_for computes whole reductions, never part of one:
//   inner == 1 (dim = -1): one task = a range of rows; a row is K contiguous elements whose element
//                          numbers are consecutive, so its noise is one run of Philox blocks.
//   inner >  1 (dim = 1 of [B, 8192, H, W] etc.): one task = a range of tiles; a tile is W consecutive
//                          inner columns (W = 16, 8 or 4; fewer at a ragged end) across all K. Each of
//                          its K rows is W contiguous elements with consecutive element numbers, so loads
//                          are sequential within a row, and every column statistic (max, sums, argmax)
//                          lives in W SIMD lanes. No transposed copy is made.
// Scratch is per task: a row's noise (overwritten in place by its scores z), or a tile's [K][W] scores
// plus the noise of kRowBatch rows at a time; never a tensor-sized temporary (K * W * 4 bytes = 512 KB
// for the dVAE's K = 8192). Per reduction the passes are: (1) Philox + noise map, vectorised across
// Philox blocks, (2) z = (x + g) / tau and its max, (3) e = exp(z - m) in place and the sums, (4) the
// output. Passes 3-4 read the scores from L1/L2, not the noise again from Philox.
//
// Vectorisation. Philox runs on 16 (AVX-512) or 8 (AVX2) blocks per instruction, written with
// intrinsics (philox_soa in noise_runs.h, shared with dvae.cpp). The other hot loops are written over
// independent elements with only selects (no branches, no library calls: log and exp come from math.h's
// branch-free versions) and are compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, baseline
// SSE2) by target_clones, picked at load time.
//
// Non-contiguous logits and grads are made contiguous first (the dVAE and sampler layouts never need it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dalle_fast/launch.h"
#include "dalle_fast/math.h"
#include "noise_runs.h"

namespace dalle_fast {
namespace {

// ------------------------------------------------------------------------------------------------
// Row kernels (inner == 1): a row of K contiguous elements.

constexpr int kLanes = 16;  // independent accumulators of the row reductions (one AVX-512 vector)

inline bool is_nan(float v) { return v != v; }
// The max of torch.argmax / softmax: NaN beats everything.
inline float max_nan(float m, float v) { return (v > m || is_nan(v)) ? v : m; }

// z[j] = (x[j] + g[j]) * scale; returns max_j z[j] (NaN if any is NaN).
template <typename T>
DF_CLONES float row_scores(const T* __restrict x, const float* __restrict g, float* __restrict z, int64_t n,
                           float scale) {
  float ml[kLanes];
  {  // the 16 lanes as two eight-lane vectors (load8_f32: one conversion instruction for fp16)
    v8f m0 = splat8(-INFINITY), m1 = m0;
    for (int64_t j = 0; j + kLanes <= n; j += kLanes) {
      const v8f v0 = (load8_f32(x + j) + load8(g + j)) * scale, v1 = (load8_f32(x + j + 8) + load8(g + j + 8)) * scale;
      store8(z + j, v0), store8(z + j + 8, v1);
      m0 = ((v0 > m0) | (v0 != v0)) ? v0 : m0;  // max_nan
      m1 = ((v1 > m1) | (v1 != v1)) ? v1 : m1;
    }
    store8(ml, m0), store8(ml + 8, m1);
  }
  int64_t j = n / kLanes * kLanes;
  float m = -INFINITY;
  for (; j < n; ++j) {
    const float v = (to_f32(x[j]) + g[j]) * scale;
    z[j] = v;
    m = max_nan(m, v);
  }
  for (int l = 0; l < kLanes; ++l) m = max_nan(m, ml[l]);
  return m;
}

// e[j] = exp(e[j] - m) in place; returns sum_j e[j] and, when dy is given, t = sum_j dy[j] * e[j].
template <typename G>
DF_CLONES void row_exp_sums(float* __restrict e, const G* __restrict dy, int64_t n, float m, float* s_out,
                            float* t_out) {
  float sl[kLanes], tl[kLanes];
  {  // the 16 lanes as two eight-lane vectors (exp8)
    const v8f mv = splat8(m);
    v8f s0 = {}, s1 = {}, t0 = {}, t1 = {};
    for (int64_t j = 0; j + kLanes <= n; j += kLanes) {
      const v8f v0 = exp8(load8(e + j) - mv), v1 = exp8(load8(e + j + 8) - mv);
      store8(e + j, v0), store8(e + j + 8, v1);
      s0 += v0, s1 += v1;
      if (dy) t0 += load8_f32(dy + j) * v0, t1 += load8_f32(dy + j + 8) * v1;
    }
    store8(sl, s0), store8(sl + 8, s1), store8(tl, t0), store8(tl + 8, t1);
  }
  int64_t j = n / kLanes * kLanes;
  float s = 0.f, t = 0.f;
  for (; j < n; ++j) {
    const float v = exp_finite_or_zero(e[j] - m);
    e[j] = v;
    s += v;
    if (dy) t += to_f32(dy[j]) * v;
  }
  for (int l = 0; l < kLanes; ++l) {
    s += sl[l];
    t += tl[l];
  }
  *s_out = s;
  *t_out = t;
}

template <typename T>
DF_CLONES void row_scale_store(const float* __restrict e, int64_t n, float scale, T* __restrict y) {
  const int64_t nv = n / 8 * 8;
  for (int64_t j = 0; j < nv; j += 8) store8_as(y + j, load8(e + j) * scale);
  for (int64_t j = nv; j < n; ++j) y[j] = from_f32<T>(e[j] * scale);
}

// dx[j] = e[j] * a * (dy[j] - b) with a = 1/(tau s), b = t/s.
template <typename T, typename G>
DF_CLONES void row_grad_store(const float* __restrict e, const G* __restrict dy, int64_t n, float a, float b,
                              T* __restrict dx) {
  const int64_t nv = n / 8 * 8;
  for (int64_t j = 0; j < nv; j += 8) store8_as(dx + j, load8(e + j) * a * (load8_f32(dy + j) - b));
  for (int64_t j = nv; j < n; ++j) dx[j] = from_f32<T>(e[j] * a * (to_f32(dy[j]) - b));
}

// The first index holding m (the row's max as row_scores returned it; NaN: the first NaN).
inline int64_t row_first_index_of(const float* z, int64_t n, float m) {
  if (is_nan(m)) {
    for (int64_t j = 0; j < n; ++j)
      if (is_nan(z[j])) return j;
  } else {
    for (int64_t j = 0; j < n; ++j)
      if (z[j] == m) return j;
  }
  return 0;  // all -inf
}

// ------------------------------------------------------------------------------------------------
// Tile kernels (inner > 1): K rows of W contiguous columns (row k of the tile at x + k * inner).
// The scores live in a [K][kW] scratch; the noise is made kRowBatch rows at a time, just before use.
// W is a compile-time width (16, 8 or 4) so that the column loops become SIMD vectors; Wt = 0 is the
// ragged last tile, with the runtime width w < 16.
//
// Rows are `inner` elements apart (4 KB for the dVAE's 32x32 maps), so every row of a tile is on a new
// page, where the hardware prefetchers stop: the loops prefetch the rows kPrefetchRows ahead themselves.

constexpr int kMaxW = 16;
constexpr int64_t kRowBatch = 64;  // rows whose Philox blocks are computed in one vectorised call
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kRowChunk = 2048;  // elements of a row (inner == 1) whose noise is made at once

template <int Wt>
struct Width {
  static constexpr int kW = Wt == 0 ? kMaxW : Wt;  // the scratch row length and per-column array size
  int wr;
  int w() const { return Wt == 0 ? wr : Wt; }  // a constant, so a full SIMD vector, unless ragged
};

template <typename T>
inline void prefetch_row(const T* p, int64_t k, int64_t K, int64_t stride, bool write) {
  if (k + kPrefetchRows < K) {
    if (write) {
      __builtin_prefetch(p + (k + kPrefetchRows) * stride, 1);
    } else {
      __builtin_prefetch(p + (k + kPrefetchRows) * stride, 0);
    }
  }
}

// z[k][c] = (x[k][c] + g) * scale for the tile whose element (0, 0) has element number `first`;
// m[c] = max over rows (NaN wins); when idx is given, also the first row of each column's max.
template <int Wt, typename T>
DF_CLONES void tile_scores(RunNoise& nz, uint64_t seed, uint64_t first, const T* __restrict x, int64_t K,
                           int64_t inner, int wr, float scale, float* __restrict z, float* __restrict m,
                           int64_t* __restrict idx) {
  const Width<Wt> W{wr};
  constexpr int kW = Width<Wt>::kW;
  float mc[kW];
  int64_t ic[kW];
  for (int c = 0; c < kW; ++c) {
    mc[c] = -INFINITY;
    ic[c] = 0;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kRowBatch) {
    const int64_t rb = std::min(kRowBatch, K - k0);
    nz.compute(seed, first + static_cast<uint64_t>(k0 * inner), static_cast<uint64_t>(inner), rb, W.w());
    for (int64_t r = 0; r < rb; ++r) {
      const int64_t k = k0 + r;
      prefetch_row(x, k, K, inner, false);
      const float* __restrict g = nz.at(r);
      const T* __restrict xr = x + k * inner;
      float* __restrict zr = z + k * kW;
      for (int c = 0; c < W.w(); ++c) {
        const float v = (to_f32(xr[c]) + g[c]) * scale;
        zr[c] = v;
        const bool take = v > mc[c] || (is_nan(v) && !is_nan(mc[c]));  // strict: ties keep the first row
        mc[c] = take ? v : mc[c];
        ic[c] = take ? k : ic[c];
      }
    }
  }
  for (int c = 0; c < W.w(); ++c) {
    m[c] = mc[c];
    if (idx) idx[c] = ic[c];
  }
}

// e = exp(z - m[c]) in place; s[c] = sum of e over rows, t[c] = sum of dy * e (when dy is given).
template <int Wt, typename G>
DF_CLONES void tile_exp_sums(float* __restrict z, const G* __restrict dy, int64_t K, int64_t inner, int wr,
                             const float* __restrict m, float* __restrict s, float* __restrict t) {
  const Width<Wt> W{wr};
  constexpr int kW = Width<Wt>::kW;
  float sc[kW], tc[kW], mc[kW];
  for (int c = 0; c < kW; ++c) {
    sc[c] = tc[c] = 0.f;
    mc[c] = c < W.w() ? m[c] : 0.f;
  }
  const int wv = W.w() / 8 * 8;  // eight columns at a time (exp8), then one
  for (int64_t k = 0; k < K; ++k) {
    float* __restrict e = z + k * kW;
    if (dy) prefetch_row(dy, k, K, inner, false);
    for (int c = 0; c < wv; c += 8) {
      const v8f v = exp8(load8(e + c) - load8(mc + c));
      store8(e + c, v);
      store8(sc + c, load8(sc + c) + v);
      if (dy) store8(tc + c, load8(tc + c) + load8_f32(dy + k * inner + c) * v);
    }
    for (int c = wv; c < W.w(); ++c) {
      const float v = exp_finite_or_zero(e[c] - mc[c]);
      e[c] = v;
      sc[c] += v;
      if (dy) tc[c] += to_f32(dy[k * inner + c]) * v;
    }
  }
  for (int c = 0; c < W.w(); ++c) {
    s[c] = sc[c];
    t[c] = tc[c];
  }
}

template <int Wt, typename T>
DF_CLONES void tile_scale_store(const float* __restrict z, int64_t K, int64_t inner, int wr,
                                const float* __restrict inv_s, T* __restrict y) {
  const Width<Wt> W{wr};
  constexpr int kW = Width<Wt>::kW;
  float a[kW];
  for (int c = 0; c < kW; ++c) a[c] = c < W.w() ? inv_s[c] : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    prefetch_row(y, k, K, inner, true);
    const float* __restrict e = z + k * kW;
    T* __restrict yr = y + k * inner;
    int c = 0;
    for (; c + 8 <= W.w(); c += 8) store8_as(yr + c, load8(e + c) * load8(a + c));
    for (; c < W.w(); ++c) yr[c] = from_f32<T>(e[c] * a[c]);
  }
}

template <int Wt, typename T, typename G>
DF_CLONES void tile_grad_store(const float* __restrict z, const G* __restrict dy, int64_t K, int64_t inner, int wr,
                               const float* __restrict a, const float* __restrict b, T* __restrict dx) {
  const Width<Wt> W{wr};
  constexpr int kW = Width<Wt>::kW;
  float ac[kW], bc[kW];
  for (int c = 0; c < kW; ++c) {
    ac[c] = c < W.w() ? a[c] : 0.f;
    bc[c] = c < W.w() ? b[c] : 0.f;
  }
  for (int64_t k = 0; k < K; ++k) {
    prefetch_row(dx, k, K, inner, true);
    const float* __restrict e = z + k * kW;
    const G* __restrict dyr = dy + k * inner;
    T* __restrict dxr = dx + k * inner;
    int c = 0;
    for (; c + 8 <= W.w(); c += 8)
      store8_as(dxr + c, load8(e + c) * load8(ac + c) * (load8_f32(dyr + c) - load8(bc + c)));
    for (; c < W.w(); ++c) dxr[c] = from_f32<T>(e[c] * ac[c] * (to_f32(dyr[c]) - bc[c]));
  }
}

template <int Wt, typename T>
DF_CLONES void tile_one_hot_store(int64_t K, int64_t inner, int wr, const int64_t* __restrict idx, T* __restrict y) {
  const Width<Wt> W{wr};
  constexpr int kW = Width<Wt>::kW;
  int64_t ic[kW];
  for (int c = 0; c < kW; ++c) ic[c] = c < W.w() ? idx[c] : -1;
  const T one = from_f32<T>(1.f), zero = from_f32<T>(0.f);
  for (int64_t k = 0; k < K; ++k) {
    prefetch_row(y, k, K, inner, true);
    T* __restrict yr = y + k * inner;
    for (int c = 0; c < W.w(); ++c) yr[c] = ic[c] == k ? one : zero;
  }
}

// ------------------------------------------------------------------------------------------------
// Drivers

enum class Mode { kSoft, kHard, kArgmax, kBackward };

struct Problem {
  uint64_t seed, offset;
  int64_t outer, K, inner;
  float inv_tau;
};

// Columns per tile: 16 (a cache line of fp32) while the [K][16] score scratch stays within half of the
// 1 MB L2 we measured on; narrower for longer reductions so that the scratch stays modest.
inline int tile_width(int64_t K, int64_t inner) {
  if (inner < 8 || K > 16384) return 4;
  if (inner < 16 || K > 8192) return 8;
  return 16;
}

struct Scratch {
  RunNoise nz;
  std::vector<float> z;
};

// One tile: columns [i0, i0 + wr) of outer slice o. The width template Wt is 16/8/4, or 0 for ragged.
template <int Wt, typename T, typename G>
void run_tile(Mode mode, const Problem& p, Scratch& sc, int64_t o, int64_t i0, int wr, const T* x, const G* dy, T* y,
              int64_t* am) {
  const int64_t K = p.K, inner = p.inner;
  const int64_t base = o * K * inner + i0;  // logical (and contiguous) index of element (o, 0, i0)
  const uint64_t first = p.offset + static_cast<uint64_t>(base);
  sc.z.resize(K * Width<Wt>::kW);
  float* z = sc.z.data();
  float m[kMaxW], s[kMaxW], t[kMaxW], a[kMaxW], b[kMaxW];
  int64_t idx[kMaxW];
  if (mode == Mode::kHard || mode == Mode::kArgmax) {
    // The argmax of x + g, before the 1/tau (whose rounding could make ties).
    tile_scores<Wt, T>(sc.nz, p.seed, first, x + base, K, inner, wr, 1.f, z, m, idx);
    if (mode == Mode::kArgmax) {
      std::memcpy(am + o * inner + i0, idx, sizeof(int64_t) * wr);
    } else {
      tile_one_hot_store<Wt, T>(K, inner, wr, idx, y + base);
    }
    return;
  }
  tile_scores<Wt, T>(sc.nz, p.seed, first, x + base, K, inner, wr, p.inv_tau, z, m, nullptr);
  if (mode == Mode::kSoft) {
    tile_exp_sums<Wt, G>(z, nullptr, K, inner, wr, m, s, t);
    for (int c = 0; c < wr; ++c) a[c] = 1.f / s[c];
    tile_scale_store<Wt, T>(z, K, inner, wr, a, y + base);
  } else {
    tile_exp_sums<Wt, G>(z, dy + base, K, inner, wr, m, s, t);
    for (int c = 0; c < wr; ++c) {
      a[c] = p.inv_tau / s[c];
      b[c] = t[c] / s[c];
    }
    tile_grad_store<Wt, T, G>(z, dy + base, K, inner, wr, a, b, y + base);
  }
}

// z[j] = (x[j] + g[j]) * scale over a row, the noise made kRowChunk elements at a time so that it is
// consumed from L1; returns the row's max (NaN wins).
template <typename T>
float row_scores_chunked(const Problem& p, Scratch& sc, int64_t base, const T* x, float* z, float scale) {
  float m = -INFINITY;
  for (int64_t j0 = 0; j0 < p.K; j0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, p.K - j0);
    sc.nz.compute(p.seed, p.offset + static_cast<uint64_t>(base + j0), 0, 1, n);
    m = max_nan(m, row_scores<T>(x + base + j0, sc.nz.at(0), z + j0, n, scale));
  }
  return m;
}

template <typename T, typename G>
void run_row(Mode mode, const Problem& p, Scratch& sc, int64_t o, const T* x, const G* dy, T* y, int64_t* am) {
  const int64_t K = p.K;
  const int64_t base = o * K;
  sc.z.resize(K);
  float* z = sc.z.data();
  if (mode == Mode::kHard || mode == Mode::kArgmax) {
    const float m = row_scores_chunked<T>(p, sc, base, x, z, 1.f);  // argmax of x + g, before the 1/tau
    const int64_t i = row_first_index_of(z, K, m);
    if (mode == Mode::kArgmax) {
      am[o] = i;
    } else {
      T* yr = y + base;
      std::fill(yr, yr + K, from_f32<T>(0.f));
      yr[i] = from_f32<T>(1.f);
    }
    return;
  }
  const float m = row_scores_chunked<T>(p, sc, base, x, z, p.inv_tau);
  float s, t;
  if (mode == Mode::kSoft) {
    row_exp_sums<G>(z, nullptr, K, m, &s, &t);
    row_scale_store<T>(z, K, 1.f / s, y + base);
  } else {
    row_exp_sums<G>(z, dy + base, K, m, &s, &t);
    row_grad_store<T, G>(z, dy + base, K, p.inv_tau / s, t / s, y + base);
  }
}

// x, dy: [outer, K, inner] contiguous; y: contiguous of the same numel (or nullptr), am: [outer, inner].
template <typename T, typename G>
void run(Mode mode, const Problem& p, const T* x, const G* dy, T* y, int64_t* am) {
  if (p.inner == 1) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.K, 1));
    at::parallel_for(0, p.outer, grain, [&](int64_t begin, int64_t end) {
      Scratch sc;
      for (int64_t o = begin; o < end; ++o) run_row<T, G>(mode, p, sc, o, x, dy, y, am);
    });
    return;
  }
  const int W = tile_width(p.K, p.inner);
  const int64_t tiles_per_outer = (p.inner + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, 16384 / (std::max<int64_t>(p.K, 1) * W));
  at::parallel_for(0, p.outer * tiles_per_outer, grain, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t o = tile / tiles_per_outer;
      const int64_t i0 = (tile % tiles_per_outer) * W;
      const int wr = static_cast<int>(std::min<int64_t>(W, p.inner - i0));
      if (wr != W) {
        run_tile<0, T, G>(mode, p, sc, o, i0, wr, x, dy, y, am);
      } else if (W == 16) {
        run_tile<16, T, G>(mode, p, sc, o, i0, wr, x, dy, y, am);
      } else if (W == 8) {
        run_tile<8, T, G>(mode, p, sc, o, i0, wr, x, dy, y, am);
      } else {
        run_tile<4, T, G>(mode, p, sc, o, i0, wr, x, dy, y, am);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Ops: argument checks, views, dtype dispatch.

Problem make_problem(int64_t seed, int64_t offset, int64_t outer, int64_t K, int64_t inner, double tau) {
  return Problem{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), outer, K, inner,
                 static_cast<float>(1.0 / tau)};
}

at::Tensor gumbel_noise_cpu(const at::Tensor& like, at::IntArrayRef shape, int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_noise";
  check_float_dtype(like, op, "like");
  check_cpu(like, op, "like");
  int64_t numel = 1;
  for (const int64_t s : shape) {
    TORCH_CHECK(s >= 0, op, ": shape: expected non-negative sizes, got ", shape);
    numel *= s;
  }
  check_offset(offset, numel, op);
  at::Tensor out = at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
  if (numel == 0) return out;
  constexpr int64_t kChunk = 4096;  // elements per noise run (multiple of 4: runs start aligned)
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* y = out.data_ptr<T>();
    at::parallel_for(0, (numel + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
      RunNoise nz;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t i0 = chunk * kChunk, n = std::min(kChunk, numel - i0);
        nz.compute(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + i0, 0, 1, n);
        row_scale_store<T>(nz.at(0), n, 1.f, y + i0);
      }
    });
  });
  return out;
}

at::Tensor gumbel_softmax_fwd_cpu(const at::Tensor& logits, double tau, bool hard, int64_t dim, int64_t seed,
                                  int64_t offset) {
  constexpr const char* op = "gumbel_softmax_fwd";
  check_float_dtype(logits, op, "logits");
  check_cpu(logits, op, "logits");
  check_logits(logits, dim, op);
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.numel() == 0) return out;
  const ReductionView x = reduction_view(logits, dim);
  const Problem p = make_problem(seed, offset, x.outer, x.K, x.inner, tau);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run<T, T>(hard ? Mode::kHard : Mode::kSoft, p, x.t.data_ptr<T>(), nullptr, out.data_ptr<T>(), nullptr);
  });
  return out;
}

at::Tensor gumbel_softmax_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, double tau, int64_t dim,
                                  int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_softmax_bwd";
  check_float_dtype(logits, op, "logits");
  check_float_dtype(grad, op, "grad");
  check_cpu(logits, op, "logits");
  TORCH_CHECK(grad.device() == logits.device(), op, ": grad: expected the device of logits (", logits.device(),
              "), got ", grad.device());
  check_logits(logits, dim, op);
  TORCH_CHECK(grad.sizes() == logits.sizes(), op, ": grad: expected the shape of logits ", logits.sizes(), ", got ",
              grad.sizes());
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.numel() == 0) return out;
  const ReductionView x = reduction_view(logits, dim), dy = reduction_view(grad, dim);
  const Problem p = make_problem(seed, offset, x.outer, x.K, x.inner, tau);
  dispatch_float(logits.scalar_type(), [&](auto xtag) {
    using T = decltype(xtag);
    dispatch_float(grad.scalar_type(), [&](auto gtag) {
      using G = decltype(gtag);
      run<T, G>(Mode::kBackward, p, x.t.data_ptr<T>(), dy.t.data_ptr<G>(), out.data_ptr<T>(), nullptr);
    });
  });
  return out;
}

at::Tensor gumbel_argmax_cpu(const at::Tensor& logits, int64_t dim, int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_argmax";
  check_float_dtype(logits, op, "logits");
  check_cpu(logits, op, "logits");
  check_logits(logits, dim, op);
  check_offset(offset, logits.numel(), op);
  at::Tensor out = argmax_output(logits, dim, op);
  if (out.numel() == 0) return out;
  const ReductionView x = reduction_view(logits, dim);
  const Problem p = make_problem(seed, offset, x.outer, x.K, x.inner, 1.0);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run<T, T>(Mode::kArgmax, p, x.t.data_ptr<T>(), nullptr, nullptr, out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("gumbel_noise", &dalle_fast::gumbel_noise_cpu);
  m.impl("gumbel_softmax_fwd", &dalle_fast::gumbel_softmax_fwd_cpu);
  m.impl("gumbel_softmax_bwd", &dalle_fast::gumbel_softmax_bwd_cpu);
  m.impl("gumbel_argmax", &dalle_fast::gumbel_argmax_cpu);
}
