// C++ CPU backend of the dVAE's fused ops: gumbel_quantize_fwd / _bwd, logit_laplace_nll_fwd / _bwd,
// categorical_kl_uniform_fwd / _bwd (schemas in csrc/ops.cpp, per-element math in dalle_fast/dvae.h).
//
// gumbel_quantize. logits [B, K, S] (S = H * W, codes on dim 1), codebook W [C, K] (fp32 copy), bias [C].
// One task of at::parallel_for owns a tile of P consecutive pixels of one image (P = 64, fewer for large
// K so that the [K][P] fp32 scratch stays <= 512 KB) and never materialises more than that tile:
//   forward   noise (Philox, all four lanes) -> z = (x + g) / tau -> per pixel max, exp, sum (lse) ->
//             y = e / s in the scratch -> out tile = W @ y (one sgemm of [C, K] x [K, P]) + bias.
//             hard: the argmax of x + g (before 1/tau, like gumbel_softmax), out = W[:, argmax] + bias.
//   backward  recompute z and y = exp(z - lse) (lse saved by the forward: [B, S] fp32), G = W^T @ dout
//             ([K, C] x [C, P]), t = sum_k y G, dx = (1/tau) y (G - t); dW += dout @ y^T (hard: the
//             one-hot of the saved argmax) into one fp32 [C, K] partial per task group, summed in a fixed
//             order (deterministic for a given thread count).
// The relaxed one-hots exist only as the per-task [K][P] scratch, forward and backward.
//
// Losses: one pass over the inputs each way; the scalar reductions sum per-chunk partials in fp64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dalle_fast/dvae.h"
#include "dalle_fast/launch.h"
#include "dalle_fast/math.h"
#include "noise_runs.h"

namespace dalle_fast {
namespace {

void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kReduceNone || reduction == kReduceMean || reduction == kReduceSum, op,
              ": reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// ------------------------------------------------------------------------------------------------
// gumbel_quantize

constexpr int kTile = 64;          // pixels per task tile (scratch row length)
constexpr int64_t kNoiseRows = 64;  // codes whose noise is made in one vectorised call

struct QProblem {
  uint64_t seed, offset;
  int64_t B, K, S, C;
  float inv_tau;
  bool hard;
};

inline int tile_pixels(int64_t K) {
  int64_t p = (int64_t{1} << 17) / std::max<int64_t>(K, 1);  // [K][P] fp32 scratch <= 512 KB
  p = std::max<int64_t>(8, std::min<int64_t>(kTile, p));
  return static_cast<int>(p / 4 * 4);
}

// z[k][j] = (x + g) * inv_tau for the tile's w pixels (scratch row stride P); per pixel the max of z
// (m) and, for hard mode, the argmax of x + g (first index on ties, NaN wins, like torch.argmax).
template <typename T, bool kArgmax>
DF_CLONES void tile_scores(RunNoise& nz, const QProblem& p, const T* __restrict x, int64_t b, int64_t s0, int w, int P,
                           float* __restrict z, float* __restrict m, int64_t* __restrict idx) {
  float mc[kTile], vc[kTile];
  int64_t ic[kTile];
  for (int j = 0; j < w; ++j) {
    mc[j] = -INFINITY;
    vc[j] = -INFINITY;
    ic[j] = 0;
  }
  const int64_t K = p.K, S = p.S;
  for (int64_t k0 = 0; k0 < K; k0 += kNoiseRows) {
    const int64_t rb = std::min(kNoiseRows, K - k0);
    nz.compute(p.seed, p.offset + static_cast<uint64_t>((b * K + k0) * S + s0), static_cast<uint64_t>(S), rb, w);
    for (int64_t r = 0; r < rb; ++r) {
      const int64_t k = k0 + r;
      const float* __restrict g = nz.at(r);
      const T* __restrict xr = x + (b * K + k) * S + s0;
      float* __restrict zr = z + k * P;
      for (int j = 0; j < w; ++j) {
        const float v = to_f32(xr[j]) + g[j];
        const float zz = v * p.inv_tau;
        zr[j] = zz;
        mc[j] = (zz > mc[j] || zz != zz) ? zz : mc[j];
        if (kArgmax) {
          const bool take = v > vc[j] || (v != v && vc[j] == vc[j]);
          vc[j] = take ? v : vc[j];
          ic[j] = take ? k : ic[j];
        }
      }
    }
  }
  for (int j = 0; j < w; ++j) {
    m[j] = mc[j];
    if (idx) idx[j] = ic[j];
  }
}

// e = exp(z - m) in place, s = sum_k e; returns lse = m + log s per pixel.
DF_CLONES void tile_exp_sum(float* __restrict z, int64_t K, int w, int P, const float* __restrict m,
                            float* __restrict s) {
  float sc[kTile], mc[kTile];
  for (int j = 0; j < w; ++j) {
    sc[j] = 0.f;
    mc[j] = m[j] == -INFINITY ? 0.f : m[j];
  }
  const int wv = w / 8 * 8;  // eight pixels at a time (exp8), then one
  for (int64_t k = 0; k < K; ++k) {
    float* __restrict e = z + k * P;
    for (int j = 0; j < wv; j += 8) {
      const v8f v = exp8(load8(e + j) - load8(mc + j));
      store8(e + j, v);
      store8(sc + j, load8(sc + j) + v);
    }
    for (int j = wv; j < w; ++j) {
      const float v = exp_finite_or_zero(e[j] - mc[j]);
      e[j] = v;
      sc[j] += v;
    }
  }
  for (int j = 0; j < w; ++j) s[j] = sc[j];
}

// y = z * a[j] in place (a = 1/s) or y = exp(z - lse[j]) in place.
DF_CLONES void tile_scale(float* __restrict z, int64_t K, int w, int P, const float* __restrict a) {
  for (int64_t k = 0; k < K; ++k) {
    float* __restrict e = z + k * P;
    for (int j = 0; j < w; ++j) e[j] *= a[j];
  }
}

DF_CLONES void tile_softmax_from_lse(float* __restrict z, int64_t K, int w, int P, const float* __restrict lse) {
  const int wv = w / 8 * 8;
  for (int64_t k = 0; k < K; ++k) {
    float* __restrict e = z + k * P;
    for (int j = 0; j < wv; j += 8) store8(e + j, exp8(load8(e + j) - load8(lse + j)));
    for (int j = wv; j < w; ++j) e[j] = exp_finite_or_zero(e[j] - lse[j]);
  }
}

// t[j] = sum_k y G; then G <- inv_tau * y * (G - t) (the logits' gradient), written to dx.
template <typename T>
DF_CLONES void tile_logit_grad(const float* __restrict y, const float* __restrict G, int64_t K, int w, int P,
                               float inv_tau, T* __restrict dx, int64_t dx_stride) {
  float t[kTile];
  for (int j = 0; j < w; ++j) t[j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict yr = y + k * P;
    const float* __restrict gr = G + k * w;
    for (int j = 0; j < w; ++j) t[j] += yr[j] * gr[j];
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict yr = y + k * P;
    const float* __restrict gr = G + k * w;
    T* __restrict dr = dx + k * dx_stride;
    for (int j = 0; j < w; ++j) dr[j] = from_f32<T>(inv_tau * yr[j] * (gr[j] - t[j]));
  }
}

struct QScratch {
  RunNoise nz;
  std::vector<float> z;
};

at::Tensor scratch_view(float* z, int64_t K, int w, int P) {
  return at::from_blob(z, {K, w}, {P, 1}, at::TensorOptions().dtype(at::kFloat));
}

template <typename T>
void quantize_fwd_tile(const QProblem& p, QScratch& sc, int64_t tile, int P, const T* x, const at::Tensor& W,
                       const float* bias, T* out, float* lse, int64_t* idx) {
  const int64_t tiles_per_image = (p.S + P - 1) / P;
  const int64_t b = tile / tiles_per_image, s0 = (tile % tiles_per_image) * P;
  const int w = static_cast<int>(std::min<int64_t>(P, p.S - s0));
  sc.z.resize(static_cast<size_t>(p.K) * P);
  float* z = sc.z.data();
  float m[kTile], s[kTile], a[kTile];
  int64_t am[kTile];
  if (p.hard) {
    tile_scores<T, true>(sc.nz, p, x, b, s0, w, P, z, m, am);
  } else {
    tile_scores<T, false>(sc.nz, p, x, b, s0, w, P, z, m, nullptr);
  }
  tile_exp_sum(z, p.K, w, P, m, s);
  for (int j = 0; j < w; ++j) {
    lse[b * p.S + s0 + j] = (m[j] == -INFINITY ? 0.f : m[j]) + std::log(s[j]);
    a[j] = 1.f / s[j];
  }
  const int64_t C = p.C;
  T* o = out + b * C * p.S + s0;
  if (p.hard) {
    const float* wp = W.data_ptr<float>();
    for (int j = 0; j < w; ++j) idx[b * p.S + s0 + j] = am[j];
    for (int64_t c = 0; c < C; ++c) {
      const float bc = bias ? bias[c] : 0.f;
      for (int j = 0; j < w; ++j) o[c * p.S + j] = from_f32<T>(wp[c * p.K + am[j]] + bc);
    }
    return;
  }
  tile_scale(z, p.K, w, P, a);
  const at::Tensor acc = at::mm(W, scratch_view(z, p.K, w, P));  // [C, w]
  const float* ap = acc.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float bc = bias ? bias[c] : 0.f;
    for (int j = 0; j < w; ++j) o[c * p.S + j] = from_f32<T>(ap[c * w + j] + bc);
  }
}

template <typename T>
void quantize_bwd_tile(const QProblem& p, QScratch& sc, int64_t tile, int P, const T* x, const at::Tensor& Wt,
                       const float* dout, const float* lse, const int64_t* idx, T* dx, at::Tensor& dW) {
  const int64_t tiles_per_image = (p.S + P - 1) / P;
  const int64_t b = tile / tiles_per_image, s0 = (tile % tiles_per_image) * P;
  const int w = static_cast<int>(std::min<int64_t>(P, p.S - s0));
  const int64_t K = p.K, C = p.C, S = p.S;
  sc.z.resize(static_cast<size_t>(K) * P);
  float* z = sc.z.data();
  float m[kTile];
  tile_scores<T, false>(sc.nz, p, x, b, s0, w, P, z, m, nullptr);
  tile_softmax_from_lse(z, K, w, P, lse + b * S + s0);
  const at::Tensor d = at::from_blob(const_cast<float*>(dout) + b * C * S + s0, {C, w}, {S, 1},
                                     at::TensorOptions().dtype(at::kFloat));
  const at::Tensor G = at::mm(Wt, d).contiguous();  // [K, w]
  tile_logit_grad<T>(z, G.data_ptr<float>(), K, w, P, p.inv_tau, dx + b * K * S + s0, S);
  if (p.hard) {
    float* dwp = dW.data_ptr<float>();
    const float* dp = dout + b * C * S + s0;
    for (int j = 0; j < w; ++j) {
      const int64_t k = idx[b * S + s0 + j];
      for (int64_t c = 0; c < C; ++c) dwp[c * K + k] += dp[c * S + j];
    }
  } else {
    dW.addmm_(d, scratch_view(z, K, w, P).t());
  }
}

void check_quantize_args(const at::Tensor& logits, const at::Tensor& weight, const char* op) {
  check_float_dtype(logits, op, "logits");
  check_cpu(logits, op, "logits");
  TORCH_CHECK(logits.dim() >= 2, op, ": logits: expected [B, K, *spatial] (at least 2 dims), got shape ",
              logits.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight: expected [C, K] (2 dims), got shape ", weight.sizes());
  TORCH_CHECK(weight.is_floating_point(), op, ": weight: expected a floating-point tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == logits.device(), op, ": weight: expected a tensor on ", logits.device(),
              " (the logits' device), got ", weight.device());
  TORCH_CHECK(weight.size(1) == logits.size(1), op, ": weight: expected K = ", logits.size(1),
              " columns (the codes on dim 1 of logits), got shape ", weight.sizes());
}

std::vector<int64_t> quantize_out_shape(const at::Tensor& logits, int64_t C) {
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  shape[1] = C;
  return shape;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_quantize_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      double tau, bool hard, int64_t seed,
                                                                      int64_t offset) {
  constexpr const char* op = "gumbel_quantize_fwd";
  check_quantize_args(logits, weight, op);
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
  const int64_t C = weight.size(0);
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, op, ": bias: expected shape [", C, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == logits.device(), op, ": bias: expected a tensor on ", logits.device(), ", got ",
                bias->device());
    b32 = bias->to(at::kFloat).contiguous();
  }
  const ReductionView v = reduction_view(logits, 1);
  const QProblem p{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), v.outer, v.K, v.inner, C,
                   static_cast<float>(1.0 / tau), hard};
  at::Tensor out = at::empty(quantize_out_shape(logits, C), logits.options());
  at::Tensor lse = at::empty({p.B, p.S}, logits.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({hard ? p.B : 0, hard ? p.S : 0}, logits.options().dtype(at::kLong));
  if (out.numel() == 0 || p.K == 0) {
    if (out.numel() && b32.defined()) out.copy_(b32.view({1, C, 1}).expand({p.B, C, p.S}).reshape(out.sizes()));
    else if (out.numel()) out.zero_();
    return {out, lse, idx};
  }
  const at::Tensor W = weight.to(at::kFloat).contiguous();
  const int P = tile_pixels(p.K);
  const int64_t ntiles = p.B * ((p.S + P - 1) / P);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = v.t.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      QScratch sc;
      for (int64_t t = begin; t < end; ++t)
        quantize_fwd_tile<T>(p, sc, t, P, x, W, b32.defined() ? b32.data_ptr<float>() : nullptr, o,
                             lse.data_ptr<float>(), hard ? idx.data_ptr<int64_t>() : nullptr);
    });
  });
  return {out, lse, idx};
}

std::tuple<at::Tensor, at::Tensor> gumbel_quantize_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                            const at::Tensor& weight, const at::Tensor& lse,
                                                            const at::Tensor& idx, double tau, bool hard,
                                                            int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_quantize_bwd";
  check_quantize_args(logits, weight, op);
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
  const int64_t C = weight.size(0);
  const auto out_shape = quantize_out_shape(logits, C);
  TORCH_CHECK(grad.is_floating_point() && grad.sizes() == at::IntArrayRef(out_shape), op,
              ": grad: expected a floating-point tensor of shape ", at::IntArrayRef(out_shape), ", got ",
              grad.scalar_type(), " ", grad.sizes());
  check_cpu(grad, op, "grad");
  const ReductionView v = reduction_view(logits, 1);
  const QProblem p{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), v.outer, v.K, v.inner, C,
                   static_cast<float>(1.0 / tau), hard};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == p.B * p.S, op, ": lse: expected fp32 [", p.B, ", ",
              p.S, "], got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(!hard || (idx.scalar_type() == at::kLong && idx.numel() == p.B * p.S), op, ": idx: expected int64 [",
              p.B, ", ", p.S, "] in hard mode, got ", idx.scalar_type(), " ", idx.sizes());
  at::Tensor dx = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.numel() == 0 || C == 0) {
    dx.zero_();
    return {dx, at::zeros_like(weight, at::MemoryFormat::Contiguous)};
  }
  const at::Tensor W = weight.to(at::kFloat).contiguous();
  const at::Tensor Wt = W.t();
  const at::Tensor dout = grad.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor idx_c = hard ? idx.to(at::kLong).contiguous() : idx;
  const int P = tile_pixels(p.K);
  const int64_t ntiles = p.B * ((p.S + P - 1) / P);
  const int64_t ngroups = std::max<int64_t>(1, std::min<int64_t>(ntiles, at::get_num_threads()));
  std::vector<at::Tensor> partial(ngroups);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = v.t.data_ptr<T>();
    T* d = dx.data_ptr<T>();
    at::parallel_for(0, ngroups, 1, [&](int64_t gb, int64_t ge) {
      for (int64_t grp = gb; grp < ge; ++grp) {
        QScratch sc;
        at::Tensor dW = at::zeros({C, p.K}, at::TensorOptions().dtype(at::kFloat));
        const int64_t t0 = ntiles * grp / ngroups, t1 = ntiles * (grp + 1) / ngroups;
        for (int64_t t = t0; t < t1; ++t)
          quantize_bwd_tile<T>(p, sc, t, P, x, Wt, dout.data_ptr<float>(), lse_c.data_ptr<float>(),
                               hard ? idx_c.data_ptr<int64_t>() : nullptr, d, dW);
        partial[grp] = dW;
      }
    });
  });
  at::Tensor dW = partial[0];
  for (int64_t g = 1; g < ngroups; ++g) dW.add_(partial[g]);
  return {dx, dW.to(weight.scalar_type())};
}

// ------------------------------------------------------------------------------------------------
// logit_laplace_nll

constexpr int64_t kChunk = 4096;
constexpr float kFltMinNormal = 1.17549435e-38f;

// Fills lx = ln x, l1x = ln(1 - x) for a chunk with the vectorisable log; returns false when some x
// is outside the range where that log is exact enough (x normal and x < 1): the caller redoes the chunk.
template <typename T>
DF_CLONES bool chunk_logs(const T* __restrict x, int64_t n, float* __restrict lx, float* __restrict l1x) {
  const int64_t nv = n / 8 * 8;  // eight at a time (log8), then one
  v8i badv = {};
  for (int64_t i = 0; i < nv; i += 8) {
    const v8f v = load8_f32(x + i);
    const v8i ok = (v >= kFltMinNormal) & (v < 1.f);
    badv |= ~ok;
    const v8f vc = ok ? v : splat8(0.5f);
    store8(lx + i, log8(vc));
    store8(l1x + i, log8(1.f - vc));
  }
  int bad = 0;
  for (int j = 0; j < 8; ++j) bad |= badv[j] != 0;
  for (int64_t i = nv; i < n; ++i) {
    const float v = to_f32(x[i]);
    const bool ok = v >= kFltMinNormal && v < 1.f;
    bad |= !ok;
    const float vc = ok ? v : 0.5f;
    lx[i] = log_positive_normal(vc);
    l1x[i] = log_positive_normal(1.f - vc);
  }
  return bad == 0;
}

template <typename T>
void chunk_logs_exact(const T* x, int64_t n, float* lx, float* l1x) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f32(x[i]);
    lx[i] = std::log(v);
    l1x[i] = std::log1p(-v);
  }
}

template <typename T>
void chunk_logs_any(const T* x, int64_t n, float* lx, float* l1x) {
  if (!chunk_logs<T>(x, n, lx, l1x)) chunk_logs_exact<T>(x, n, lx, l1x);
}

// ib[i] = exp(-lb[i]) for a chunk (n <= kChunk), eight at a time: the scalar exp does not vectorise.
template <typename T>
DF_CLONES void chunk_inv_b(const T* __restrict lb, int64_t n, float* __restrict ib) {
  const int64_t nv = n / 8 * 8;
  for (int64_t i = 0; i < nv; i += 8) store8(ib + i, exp8(-load8_f32(lb + i)));
  for (int64_t i = nv; i < n; ++i) ib[i] = exp_finite_or_zero(-to_f32(lb[i]));
}

template <typename T>
DF_CLONES double chunk_nll(const float* __restrict lx, const float* __restrict l1x, const T* __restrict mu,
                          const T* __restrict lb, int64_t n, float* __restrict out) {
  float ib[kChunk];
  chunk_inv_b(lb, n, ib);
  double acc = 0.0;  // fp64: a long fp32 running sum would lose ~sqrt(n) ulps
  for (int64_t i = 0; i < n; ++i) {
    const float b = to_f32(lb[i]);
    const float v = laplace_nll_value(lx[i], l1x[i], to_f32(mu[i]), b, ib[i]);
    if (out) out[i] = v;
    acc += v;
  }
  return acc;
}

template <typename T>
DF_CLONES void chunk_nll_grads(const T* __restrict x, const float* __restrict lx, const float* __restrict l1x,
                               const T* __restrict mu, const T* __restrict lb, const float* __restrict g, float gs,
                               int64_t n, T* __restrict dx, T* __restrict dmu, T* __restrict dlb) {
  float ib[kChunk];
  chunk_inv_b(lb, n, ib);
  const int64_t nv = n / 8 * 8;  // eight at a time (laplace_nll_grads of dvae.h on eight lanes), then one
  const v8f one = splat8(1.f), abs_mask = reinterpret_cast<v8f>(v8u{} + 0x7fffffffu);
  for (int64_t i = 0; i < nv; i += 8) {
    const v8f xv = load8_f32(x + i), ibv = load8(ib + i), gv = g ? load8(g + i) : splat8(gs);
    const v8f d = (load8(lx + i) - load8(l1x + i)) - load8_f32(mu + i);
    const v8f sg = d > 0.f ? one : (d < 0.f ? -one : d);  // sign_or_zero: NaN stays NaN
    const v8f inv_x = one / xv, inv_1mx = one / (one - xv);
    const v8f absd = reinterpret_cast<v8f>(reinterpret_cast<v8u>(d) & reinterpret_cast<v8u>(abs_mask));
    store8_as(dmu + i, -gv * sg * ibv);
    store8_as(dlb + i, gv * (one - absd * ibv));
    store8_as(dx + i, gv * (sg * ibv * (inv_x + inv_1mx) + inv_x - inv_1mx));
  }
  for (int64_t i = nv; i < n; ++i) {
    float a, m, l;
    laplace_nll_grads(to_f32(x[i]), lx[i], l1x[i], to_f32(mu[i]), ib[i], g ? g[i] : gs, &a, &m, &l);
    dx[i] = from_f32<T>(a);
    dmu[i] = from_f32<T>(m);
    dlb[i] = from_f32<T>(l);
  }
}

void check_loss_triple(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_b, const char* op) {
  check_float_dtype(x, op, "x");
  check_cpu(x, op, "x");
  TORCH_CHECK(mu.scalar_type() == x.scalar_type() && log_b.scalar_type() == x.scalar_type(), op,
              ": mu, log_b: expected the dtype of x (", x.scalar_type(), "), got ", mu.scalar_type(), " and ",
              log_b.scalar_type());
  TORCH_CHECK(mu.sizes() == x.sizes() && log_b.sizes() == x.sizes(), op, ": mu, log_b: expected the shape of x ",
              x.sizes(), ", got ", mu.sizes(), " and ", log_b.sizes());
  TORCH_CHECK(mu.device() == x.device() && log_b.device() == x.device(), op,
              ": mu, log_b: expected tensors on the device of x (", x.device(), ")");
}

at::Tensor logit_laplace_nll_fwd_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_b,
                                     int64_t reduction) {
  constexpr const char* op = "logit_laplace_nll_fwd";
  check_loss_triple(x, mu, log_b, op);
  check_reduction(reduction, op);
  const at::Tensor xc = x.contiguous(), mc = mu.contiguous(), bc = log_b.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = reduction == kReduceNone ? at::empty(x.sizes(), x.options().dtype(at::kFloat))
                                            : at::empty({}, x.options().dtype(at::kFloat));
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks, 0.0);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc.data_ptr<T>();
    const T* mp = mc.data_ptr<T>();
    const T* bp = bc.data_ptr<T>();
    float* op_ = reduction == kReduceNone ? out.data_ptr<float>() : nullptr;
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> lx(kChunk), l1x(kChunk);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t i0 = c * kChunk, len = std::min(kChunk, n - i0);
        chunk_logs_any<T>(xp + i0, len, lx.data(), l1x.data());
        partial[c] = chunk_nll<T>(lx.data(), l1x.data(), mp + i0, bp + i0, len, op_ ? op_ + i0 : nullptr);
      }
    });
  });
  if (reduction != kReduceNone) {
    double total = 0.0;
    for (const double v : partial) total += v;
    if (reduction == kReduceMean) total /= static_cast<double>(n);  // n == 0: NaN, like torch.mean
    out.fill_(total);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_laplace_nll_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                         const at::Tensor& mu,
                                                                         const at::Tensor& log_b, int64_t reduction) {
  constexpr const char* op = "logit_laplace_nll_bwd";
  check_loss_triple(x, mu, log_b, op);
  check_reduction(reduction, op);
  const int64_t n = x.numel();
  if (reduction == kReduceNone) {
    TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad: expected the shape of x ", x.sizes(), ", got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad: expected a scalar for a reduced loss, got shape ", grad.sizes());
  }
  const at::Tensor xc = x.contiguous(), mc = mu.contiguous(), bc = log_b.contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  float gs = 0.f;
  if (reduction != kReduceNone) {
    gs = g.item<float>();
    if (reduction == kReduceMean) gs = static_cast<float>(static_cast<double>(gs) / static_cast<double>(n));
  }
  at::Tensor dx = at::empty(x.sizes(), xc.options()), dmu = at::empty(x.sizes(), xc.options()),
             dlb = at::empty(x.sizes(), xc.options());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = xc.data_ptr<T>();
    const T* mp = mc.data_ptr<T>();
    const T* bp = bc.data_ptr<T>();
    const float* gp = reduction == kReduceNone ? g.data_ptr<float>() : nullptr;
    T *a = dx.data_ptr<T>(), *m = dmu.data_ptr<T>(), *l = dlb.data_ptr<T>();
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> lx(kChunk), l1x(kChunk);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t i0 = c * kChunk, len = std::min(kChunk, n - i0);
        chunk_logs_any<T>(xp + i0, len, lx.data(), l1x.data());
        chunk_nll_grads<T>(xp + i0, lx.data(), l1x.data(), mp + i0, bp + i0, gp ? gp + i0 : nullptr, gs, len,
                           a + i0, m + i0, l + i0);
      }
    });
  });
  return {dx, dmu, dlb};
}

// ------------------------------------------------------------------------------------------------
// categorical_kl_uniform: rows (o, i) of the [outer, K, inner] view; tiles of up to 16 rows (inner > 1:
// 16 consecutive i, read along k with stride inner) or one row (inner == 1, contiguous).

constexpr int kKLW = 16;

// Two sweeps of the tile (the second from cache): max, then sum e and sum e (l - m).
template <typename T>
DF_CLONES void kl_tile_stats(const T* __restrict x, int64_t K, int64_t stride_k, int w, float* __restrict lse,
                             float* __restrict negent) {
  float m[kKLW], s[kKLW], u[kKLW];
  for (int j = 0; j < w; ++j) {
    m[j] = -INFINITY;
    s[j] = u[j] = 0.f;
  }
  for (int64_t k = 0; k < K; ++k)
    for (int j = 0; j < w; ++j) {
      const float v = to_f32(x[k * stride_k + j]);
      m[j] = (v > m[j] || v != v) ? v : m[j];
    }
  for (int j = 0; j < w; ++j) m[j] = m[j] == -INFINITY ? 0.f : m[j];
  const int wv = w / 8 * 8;  // eight rows at a time (exp8), then one
  for (int64_t k = 0; k < K; ++k) {
    for (int j = 0; j < wv; j += 8) {
      const v8f d = load8_f32(x + k * stride_k + j) - load8(m + j);
      const v8f e = exp8(d);
      store8(s + j, load8(s + j) + e);
      store8(u + j, load8(u + j) + e * d);
    }
    for (int j = wv; j < w; ++j) {
      const float d = to_f32(x[k * stride_k + j]) - m[j];
      const float e = exp_finite_or_zero(d);
      s[j] += e;
      u[j] += e * d;
    }
  }
  for (int j = 0; j < w; ++j) kl_finish(KLStats{m[j], s[j], u[j]}, std::log(s[j]), lse + j, negent + j);
}

// Row layout (inner == 1): 16 lanes, each with its own (m, s, u) over the elements k = lane (mod 16),
// merged with kl_stats_combine (the merge the CUDA kernels use, exercised here by every CPU row test).
template <typename T>
DF_CLONES void kl_row_stats(const T* __restrict x, int64_t K, float* lse, float* negent) {
  float mc[kKLW], ms[kKLW], s[kKLW], u[kKLW];
  for (int j = 0; j < kKLW; ++j) {
    mc[j] = -INFINITY;
    s[j] = u[j] = 0.f;
  }
  const int64_t kmain = K / kKLW * kKLW;
  for (int64_t k = 0; k < kmain; k += kKLW)
    for (int j = 0; j < kKLW; ++j) {
      const float v = to_f32(x[k + j]);
      mc[j] = (v > mc[j] || v != v) ? v : mc[j];
    }
  for (int64_t k = kmain; k < K; ++k) {
    const int j = static_cast<int>(k - kmain);
    const float v = to_f32(x[k]);
    mc[j] = (v > mc[j] || v != v) ? v : mc[j];
  }
  for (int j = 0; j < kKLW; ++j) ms[j] = mc[j] == -INFINITY ? 0.f : mc[j];
  {
    const v8f m0 = load8(ms), m1 = load8(ms + 8);
    v8f s0 = {}, s1 = {}, u0 = {}, u1 = {};
    for (int64_t k = 0; k < kmain; k += kKLW) {
      const v8f d0 = load8_f32(x + k) - m0, d1 = load8_f32(x + k + 8) - m1;
      const v8f e0 = exp8(d0), e1 = exp8(d1);
      s0 += e0, s1 += e1;
      u0 += e0 * d0, u1 += e1 * d1;
    }
    store8(s, s0), store8(s + 8, s1), store8(u, u0), store8(u + 8, u1);
  }
  for (int64_t k = kmain; k < K; ++k) {
    const int j = static_cast<int>(k - kmain);
    const float d = to_f32(x[k]) - ms[j];
    const float e = exp_finite_or_zero(d);
    s[j] += e;
    u[j] += e * d;
  }
  KLStats st = kl_stats_init();
  for (int j = 0; j < kKLW; ++j) st = kl_stats_combine(st, KLStats{mc[j], s[j], u[j]});
  kl_finish(KLStats{st.m == -INFINITY ? 0.f : st.m, st.s, st.u}, std::log(st.s), lse, negent);
}

template <typename T>
DF_CLONES void kl_tile_grad(const T* __restrict x, int64_t K, int64_t stride_k, int w, const float* __restrict lse,
                            const float* __restrict negent, const float* __restrict g, T* __restrict dx) {
  float lc[kKLW], nc[kKLW], gc[kKLW];
  for (int j = 0; j < w; ++j) {
    lc[j] = lse[j];
    nc[j] = negent[j];
    gc[j] = g[j];
  }
  const int wv = w / 8 * 8;  // eight rows at a time (exp8), then one
  for (int64_t k = 0; k < K; ++k) {
    for (int j = 0; j < wv; j += 8) {
      const v8f l = load8_f32(x + k * stride_k + j), ls = load8(lc + j);
      store8_as(dx + k * stride_k + j, kl_grad(l, ls, load8(nc + j), exp8(l - ls), load8(gc + j)));
    }
    for (int j = wv; j < w; ++j) {
      const float l = to_f32(x[k * stride_k + j]);
      const float q = exp_finite_or_zero(l - lc[j]);
      dx[k * stride_k + j] = from_f32<T>(kl_grad(l, lc[j], nc[j], q, gc[j]));
    }
  }
}

template <typename T>
DF_CLONES void kl_row_grad(const T* __restrict x, int64_t K, float lse, float negent, float g, T* __restrict dx) {
  const int64_t kv = K / 8 * 8;
  const v8f ls = splat8(lse), ng = splat8(negent), gg = splat8(g);
  for (int64_t k = 0; k < kv; k += 8) {
    const v8f l = load8_f32(x + k);
    store8_as(dx + k, kl_grad(l, ls, ng, exp8(l - ls), gg));
  }
  for (int64_t k = kv; k < K; ++k) {
    const float l = to_f32(x[k]);
    dx[k] = from_f32<T>(kl_grad(l, lse, negent, exp_finite_or_zero(l - lse), g));
  }
}

// Calls f(o, i0, w) for every tile of rows.
template <typename F>
void for_kl_tiles(int64_t outer, int64_t K, int64_t inner, F&& f) {
  const int64_t tpo = inner == 1 ? 1 : (inner + kKLW - 1) / kKLW;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * (inner == 1 ? 1 : kKLW)));
  at::parallel_for(0, outer * tpo, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / tpo, i0 = (t % tpo) * kKLW;
      f(o, inner == 1 ? 0 : i0, inner == 1 ? 1 : static_cast<int>(std::min<int64_t>(kKLW, inner - i0)));
    }
  });
}

std::vector<int64_t> shape_without(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (d != dim) s.push_back(t.size(d));
  return s;
}

std::tuple<at::Tensor, at::Tensor> categorical_kl_uniform_fwd_cpu(const at::Tensor& logits, int64_t dim,
                                                                  int64_t reduction) {
  constexpr const char* op = "categorical_kl_uniform_fwd";
  check_float_dtype(logits, op, "logits");
  check_cpu(logits, op, "logits");
  check_logits(logits, dim, op);
  check_reduction(reduction, op);
  const ReductionView v = reduction_view(logits, dim);
  const int64_t R = v.outer * v.inner;
  at::Tensor stats = at::empty({2, R}, logits.options().dtype(at::kFloat));  // lse, negent per row
  float* lse = stats.data_ptr<float>();
  float* neg = lse + R;
  if (R > 0 && v.K > 0) {
    dispatch_float(logits.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* x = v.t.data_ptr<T>();
      for_kl_tiles(v.outer, v.K, v.inner, [&](int64_t o, int64_t i0, int w) {
        const int64_t r = o * v.inner + i0;
        if (v.inner == 1) {
          kl_row_stats<T>(x + o * v.K, v.K, lse + r, neg + r);
        } else {
          kl_tile_stats<T>(x + o * v.K * v.inner + i0, v.K, v.inner, w, lse + r, neg + r);
        }
      });
    });
  } else {
    stats.fill_(NAN);
  }
  const at::Tensor kl = (stats[1] + std::log(static_cast<double>(v.K))).view(shape_without(logits, dim));
  if (reduction == kReduceNone) return {kl, stats};
  return {reduction == kReduceMean ? kl.mean() : kl.sum(), stats};
}

at::Tensor categorical_kl_uniform_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats,
                                          int64_t dim, int64_t reduction) {
  constexpr const char* op = "categorical_kl_uniform_bwd";
  check_float_dtype(logits, op, "logits");
  check_cpu(logits, op, "logits");
  check_logits(logits, dim, op);
  check_reduction(reduction, op);
  const ReductionView v = reduction_view(logits, dim);
  const int64_t R = v.outer * v.inner;
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 * R, op, ": stats: expected fp32 [2, ", R,
              "], got ", stats.scalar_type(), " ", stats.sizes());
  if (reduction == kReduceNone) {
    TORCH_CHECK(grad.numel() == R, op, ": grad: expected ", R, " elements (logits' shape without dim), got shape ",
                grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad: expected a scalar for a reduced loss, got shape ", grad.sizes());
  }
  at::Tensor g = grad.to(at::kFloat).reshape({-1});
  if (reduction == kReduceMean) g = g / static_cast<double>(R);
  g = g.expand({R}).contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor dx = at::empty({v.outer, v.K, v.inner}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() > 0) {
    dispatch_float(logits.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* x = v.t.data_ptr<T>();
      T* d = dx.data_ptr<T>();
      const float* lse = st.data_ptr<float>();
      const float* neg = lse + R;
      const float* gp = g.data_ptr<float>();
      for_kl_tiles(v.outer, v.K, v.inner, [&](int64_t o, int64_t i0, int w) {
        const int64_t r = o * v.inner + i0;
        if (v.inner == 1) {
          kl_row_grad<T>(x + o * v.K, v.K, lse[r], neg[r], gp[r], d + o * v.K);
        } else {
          const int64_t base = o * v.K * v.inner + i0;
          kl_tile_grad<T>(x + base, v.K, v.inner, w, lse + r, neg + r, gp + r, d + base);
        }
      });
    });
  }
  return dx.view(logits.sizes());
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("gumbel_quantize_fwd", &dalle_fast::gumbel_quantize_fwd_cpu);
  m.impl("gumbel_quantize_bwd", &dalle_fast::gumbel_quantize_bwd_cpu);
  m.impl("logit_laplace_nll_fwd", &dalle_fast::logit_laplace_nll_fwd_cpu);
  m.impl("logit_laplace_nll_bwd", &dalle_fast::logit_laplace_nll_bwd_cpu);
  m.impl("categorical_kl_uniform_fwd", &dalle_fast::categorical_kl_uniform_fwd_cpu);
  m.impl("categorical_kl_uniform_bwd", &dalle_fast::categorical_kl_uniform_bwd_cpu);
}
