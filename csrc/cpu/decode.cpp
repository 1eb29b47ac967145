// C++ CPU backend of sparse_decode_attention (schema in csrc/ops.cpp, semantics in dalle_fast/ops/decode.py).
//
// One task per (batch, head, query) over at::parallel_for. A task walks the key ranges of its query
// (decode_key_range of attention.h, shared with the CUDA kernel: the text prefix, then the kind's image
// ranges) in chunks of at most kChunk keys: scores s = scale * q . k of the chunk, then the online softmax
// (attention.h's -inf-safe helpers; exp is math.h's exp_finite_or_zero, which vectorises) and
// acc = alpha acc + sum p v. Only the allowed keys are read; rows of the caches past the last query are never
// touched. fp32 rows are read in place (a range's rows are evenly spaced: its step times the row stride is the
// leading dimension); fp16 / bf16 rows are converted to fp32 into a per-task buffer first. The dot products
// (eight keys at a time) and row updates are written on GCC's eight-float vectors and compiled for AVX-512,
// AVX2 and baseline (target_clones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common.h"
#include "dalle_fast/attention.h"
#include "dalle_fast/decode_launch.h"
#include "dalle_fast/math.h"

namespace dalle_fast {
namespace {

constexpr int kChunk = 64;  // keys per chunk of the online softmax

// v8f (common.h): accumulators of this type stay in registers, where the loops over float arrays that did the
// same kept them on the stack.

// Lanes [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (lane i of a is ai).
DF_VEC v8f pair_sums(v8f a, v8f b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The lane sums of eight vectors as one vector (lane r: the sum of a[r]'s lanes), a fixed tree of adds.
DF_VEC v8f lane_sums(const v8f (&a)[8]) {
  const v8f lo = pair_sums(pair_sums(a[0], a[1]), pair_sums(a[2], a[3]));  // [a0..a3 lanes 0-3, a0..a3 lanes 4-7]
  const v8f hi = pair_sums(pair_sums(a[4], a[5]), pair_sums(a[6], a[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// s[j] = alpha * q . k_j for n rows k_j = k + j * ldk, D a multiple of 32 (the head sizes 32, 64, 128 that
// ops/decode.py admits). Eight keys at a time: one accumulator of eight lanes per key (d = u, u + 8, ...; the
// last group of a chunk repeats its last row so that the loop is always eight wide), then the eight lane sums
// as one vector (lane_sums: a tree of shuffles, where a sum per key would be a chain of scalar adds).
DF_CLONES void chunk_scores(const float* __restrict__ q, const float* __restrict__ k, int64_t ldk, int n, int D,
                            float alpha, float* __restrict__ s) {
  for (int j = 0; j < n; j += 8) {
    const float* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = k + std::min(j + r, n - 1) * ldk;
    v8f a[8] = {};
    for (int d = 0; d < D; d += 8) {
      const v8f qd = load8(q + d);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) a[r] += qd * load8(rows[r] + d);
    }
    float sums[8];
    store8(sums, lane_sums(a));
    for (int r = 0; r < std::min(8, n - j); ++r) s[j + r] = sums[r] * alpha;
  }
}

// acc = rescale * acc + sum_j p[j] v_j for n rows v_j = v + j * ldv, D a multiple of 32: 32 columns at a time
// in registers over all rows, each column's sum in ascending j.
DF_CLONES void chunk_update(float* __restrict__ acc, float rescale, const float* __restrict__ p,
                            const float* __restrict__ v, int64_t ldv, int n, int D) {
  const v8f r = {rescale, rescale, rescale, rescale, rescale, rescale, rescale, rescale};
  for (int d = 0; d < D; d += 32) {
    v8f a0 = r * load8(acc + d), a1 = r * load8(acc + d + 8), a2 = r * load8(acc + d + 16), a3 = r * load8(acc + d + 24);
    for (int j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* vr = v + j * ldv + d;
      a0 += pj * load8(vr), a1 += pj * load8(vr + 8), a2 += pj * load8(vr + 16), a3 += pj * load8(vr + 24);
    }
    store8(acc + d, a0), store8(acc + d + 8, a1), store8(acc + d + 16, a2), store8(acc + d + 24, a3);
  }
}

// p[j] = exp(s[j] - shift), returns their sum.
DF_CLONES float chunk_exp(float* s, int n, float shift) {
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    s[j] = exp_finite_or_zero(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// n rows of a range as fp32: in place for float, converted into buf otherwise; returns the leading dimension.
template <typename T>
const float* rows_f32(const T* base, int64_t ld, int n, int D, float* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    *ld_out = ld;
    return base;
  } else {
    for (int j = 0; j < n; ++j)
      for (int d = 0; d < D; ++d) buf[j * D + d] = to_f32(base[j * ld + d]);
    *ld_out = D;
    return buf;
  }
}

// Calls f(key0, step, n) for each chunk of at most kChunk keys of the key ranges query pos may read (the
// text prefix, then the kind's image ranges: decode_key_range of attention.h, shared with the CUDA kernel).
template <typename F>
void for_each_key_chunk(const MaskSpec& m, int pos, F&& f) {
  const int slots = decode_slot_count(m);
  for (int slot = 0; slot < slots; ++slot) {
    const KeyRange r = decode_key_range(m, pos, slot);
    for (int c0 = 0; c0 < r.count; c0 += kChunk)
      f(r.start + static_cast<int64_t>(c0) * r.step, r.step, std::min(kChunk, r.count - c0));
  }
}

// The online softmax of one query over the chunks added: acc [D] = sum_j exp(s_j - max) v_j, l = sum_j
// exp(s_j - max), max the running maximum (attention.h's -inf-safe rescale and shift).
struct OnlineSoftmax {
  float* acc;  // D floats, zeroed by the caller
  int D;
  float mx = -INFINITY, l = 0.f;
  // s: the chunk's n scores (overwritten by their weights), v: its rows, leading dimension ldv.
  void add(float* s, int n, const float* v, int64_t ldv) {
    float cmax = -INFINITY;
    for (int j = 0; j < n; ++j) cmax = std::max(cmax, s[j]);
    const float m_new = std::max(mx, cmax);
    const float rescale = online_softmax_rescale(mx, m_new);
    l = l * rescale + chunk_exp(s, n, online_softmax_shift(m_new));
    mx = m_new;
    chunk_update(acc, rescale, s, v, ldv, n, D);
  }
  float inv_sum() const { return l > 0.f ? 1.f / l : 0.f; }  // every query sees itself: l > 0
};

template <typename T>
void decode_forward(const DecodeProblem& p, int64_t position, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, at::Tensor& out) {
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();  // [B, n, H, D] contiguous
  const int D = static_cast<int>(p.D);
  const int64_t tasks = p.B * p.H * p.n;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), s(kChunk), kbuf(kChunk * D), vbuf(kChunk * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % p.n, bh = task / p.n, b = bh / p.H, h = bh % p.H;
      const int pos = static_cast<int>(position + t);
      const T* qr = Q + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
      for (int d = 0; d < D; ++d) qf[d] = to_f32(qr[d]);
      const T* kb = K + b * k.stride(0) + h * k.stride(1);
      const T* vb = V + b * v.stride(0) + h * v.stride(1);
      std::fill(acc.begin(), acc.end(), 0.f);
      OnlineSoftmax sm{acc.data(), D};
      for_each_key_chunk(p.m, pos, [&](int64_t key0, int64_t step, int nc) {
        int64_t lk, lv;
        const float* kr = rows_f32(kb + key0 * k.stride(2), step * k.stride(2), nc, D, kbuf.data(), &lk);
        chunk_scores(qf.data(), kr, lk, nc, D, p.scale, s.data());
        const float* vr = rows_f32(vb + key0 * v.stride(2), step * v.stride(2), nc, D, vbuf.data(), &lv);
        sm.add(s.data(), nc, vr, lv);
      });
      const float inv = sm.inv_sum();
      T* orow = O + ((b * p.n + t) * p.H + h) * D;
      for (int d = 0; d < D; ++d) orow[d] = from_f32<T>(acc[d] * inv);
    }
  });
}

// ---- decode_step: one decoding step of a whole pre-norm transformer in one call (fp32) -------------------
//
// At the sizes a CPU decodes (a few rows of d_model 128 .. 512) a step is dozens of small ops, and the
// per-op costs (dispatcher, allocation, a GEMV that ATen runs at a few GFLOP/s at one row) are most of it.
// This runs the whole step in C++ on per-call scratch buffers: per resblock the layer norm, the in
// projection (attention: q, k, v, with k and v written into the cache at `position`; MLP: fc, then GELU), the
// attention of q to the cache (the mask's key ranges, as above; dense: every cache row up to the position,
// the mask applied per key, as a dense cache does), the out projection and the residual add; then the final norm and
// the head. The products are linear_panels (weights packed in panels of 16 output columns by the caller,
// compiled per ISA).

// y[b, n] = bias[n] + sum_k x[b, k] w[n, k] for the column panels [p0, p1) of a weight packed in panels of
// 16 output columns, wp [P, K, 16] (zero past N): every load is contiguous and a panel (K * 64 bytes) stays in
// cache while all input rows pass. Four input rows at a time (eight accumulators), one multiply-add chain per
// output in ascending k; no horizontal sums (at one input row they cost more than the products).
DF_CLONES void linear_panels(const float* __restrict__ x, int64_t B, int64_t K, const float* __restrict__ wp,
                             const float* __restrict__ bias, int64_t N, int64_t p0, int64_t p1, float* __restrict__ y) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p * 16, nc = std::min<int64_t>(16, N - n);
    const float* w = wp + p * K * 16;
    float bias16[16] = {}, out[4][16];
    std::copy_n(bias + n, nc, bias16);
    const v8f b0 = load8(bias16), b1 = load8(bias16 + 8);
    const auto store = [&](int64_t b, v8f lo, v8f hi) {
      if (nc == 16) {
        store8(y + b * N + n, lo), store8(y + b * N + n + 8, hi);
      } else {
        store8(out[0], lo), store8(out[0] + 8, hi);
        std::copy_n(out[0], nc, y + b * N + n);
      }
    };
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) {
      v8f a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
      const float *x0 = x + b * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
      for (int64_t k = 0; k < K; ++k) {
        const v8f w0 = load8(w + k * 16), w1 = load8(w + k * 16 + 8);
        a00 += x0[k] * w0, a01 += x0[k] * w1;
        a10 += x1[k] * w0, a11 += x1[k] * w1;
        a20 += x2[k] * w0, a21 += x2[k] * w1;
        a30 += x3[k] * w0, a31 += x3[k] * w1;
      }
      store(b, a00, a01), store(b + 1, a10, a11), store(b + 2, a20, a21), store(b + 3, a30, a31);
    }
    for (; b < B; ++b) {  // one row: two chains per half of k (the sum is split at K / 2), for latency
      v8f a0 = b0, a1 = b1, c0 = {}, c1 = {};
      const float* xr = x + b * K;
      const int64_t h = K / 2;
      for (int64_t k = 0; k < h; ++k) {
        a0 += xr[k] * load8(w + k * 16), a1 += xr[k] * load8(w + k * 16 + 8);
        c0 += xr[h + k] * load8(w + (h + k) * 16), c1 += xr[h + k] * load8(w + (h + k) * 16 + 8);
      }
      for (int64_t k = 2 * h; k < K; ++k) a0 += xr[k] * load8(w + k * 16), a1 += xr[k] * load8(w + k * 16 + 8);
      store(b, a0 + c0, a1 + c1);
    }
  }
}

// y [B, N] = x [B, K] W^T + bias, W packed (linear_panels). Panels split across threads when the product
// has at least ~64k multiply-adds per panel group.
void linear(const float* x, int64_t B, int64_t K, const at::Tensor& wp, const at::Tensor& bias, float* y) {
  const int64_t N = bias.numel(), panels = wp.size(0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 16 * B * K));
  const float* W = wp.data_ptr<float>();
  const float* bb = bias.data_ptr<float>();
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) { linear_panels(x, B, K, W, bb, N, begin, end, y); });
}

// Layer norm of B rows of d: y = (x - mean) / sqrt(var + eps) * gain + bias (two passes, biased variance).
DF_CLONES void layer_norm_rows(const float* __restrict__ x, int64_t B, int64_t d, const float* __restrict__ gain,
                               const float* __restrict__ bias, float eps, float* __restrict__ y) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * d;
    float sum = 0.f;
    for (int64_t i = 0; i < d; ++i) sum += xr[i];
    const float mean = sum / static_cast<float>(d);
    float sq = 0.f;
    for (int64_t i = 0; i < d; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const float rstd = 1.f / std::sqrt(sq / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[b * d + i] = (xr[i] - mean) * rstd * gain[i] + bias[i];
  }
}

// erf, |error| < 1e-7: x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) = 1 in float), the rational
// approximation Eigen and XLA use. Written once for a float and for eight (a GCC vector): the clamps of the
// scalar form are control flow to GCC's vectoriser, the vector form's selects are not.
template <typename T>
DF_VEC T erf_rational(T x) {
  T x2 = x * x;
  T p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = x2 * p - 2.10102402082508e-06f;
  p = x2 * p - 5.69250639462346e-05f;
  p = x2 * p - 7.34990630326855e-04f;
  p = x2 * p - 2.95459980854025e-03f;
  p = x2 * p - 1.60960333262415e-02f;
  T q = x2 * -1.45660718464996e-05f - 2.13374055278905e-04f;
  q = x2 * q - 1.68282697438203e-03f;
  q = x2 * q - 7.37332916720468e-03f;
  q = x2 * q - 1.42647390514189e-02f;
  return x * p / q;
}

// GELU (erf form, F.gelu's default) in place; NaN stays NaN.
DF_CLONES void gelu_inplace(float* __restrict__ x, int64_t n) {
  constexpr float kRsqrt2 = 0.70710678118654752f;
  const v8f lo = v8f{} - 4.f, hi = v8f{} + 4.f;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = load8(x + i);
    v8f t = v * kRsqrt2;
    t = t > hi ? hi : t;
    t = t < lo ? lo : t;
    store8(x + i, 0.5f * v * (1.f + erf_rational(t)));
  }
  for (; i < n; ++i) {
    const float t = std::min(std::max(x[i] * kRsqrt2, -4.f), 4.f);
    x[i] = x[i] != x[i] ? x[i] : 0.5f * x[i] * (1.f + erf_rational(t));
  }
}

// o [D]: the query q [D] of head h at raster position pos attends the cache rows of one sequence (row r of
// head h at kc + r * ld + h * D). Sparse: the mask's key ranges; dense: every row 0 .. pos, each scored, then
// masked per key (raster_allowed), as a dense cache does.
void attend_cache(const MaskSpec& m, bool dense, int pos, int64_t h, int D, float scale,
                  const float* q, const float* kc, const float* vc, int64_t ld, float* o, float* s) {
  const float* kb = kc + h * D;
  const float* vb = vc + h * D;
  float acc[128];
  std::fill(acc, acc + D, 0.f);
  OnlineSoftmax sm{acc, D};
  if (dense) {
    for (int64_t key0 = 0; key0 <= pos; key0 += kChunk) {
      const int nc = static_cast<int>(std::min<int64_t>(kChunk, pos + 1 - key0));
      chunk_scores(q, kb + key0 * ld, ld, nc, D, scale, s);
      for (int j = 0; j < nc; ++j)
        if (!raster_allowed(m, pos, static_cast<int>(key0 + j))) s[j] = -INFINITY;
      sm.add(s, nc, vb + key0 * ld, ld);
    }
  } else {
    for_each_key_chunk(m, pos, [&](int64_t key0, int64_t step, int nc) {
      chunk_scores(q, kb + key0 * ld, step * ld, nc, D, scale, s);
      sm.add(s, nc, vb + key0 * ld, step * ld);
    });
  }
  const float inv = sm.inv_sum();
  for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
}

// w is a weight of n outputs and k inputs packed in panels of 16 outputs: [ceil(n / 16), k, 16].
bool packed_as(const at::Tensor& w, int64_t n, int64_t k) {
  return w.dim() == 3 && w.size(0) == (n + 15) / 16 && w.size(1) == k && w.size(2) == 16;
}

at::Tensor decode_step_cpu(const at::Tensor& x_in, at::TensorList params, at::TensorList k_caches,
                           at::TensorList v_caches, int64_t position, at::IntArrayRef kinds, at::ArrayRef<double> eps,
                           int64_t n_heads, int64_t text_len, int64_t grid_h, int64_t grid_w, int64_t kernel,
                           bool torus, bool dense) {
  constexpr const char* op = "decode_step";
  const int64_t nb = static_cast<int64_t>(kinds.size());
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2, op,
              ": x: expected a 2-dim float32 CPU tensor [B, d_model], got ", x_in.scalar_type(), " ", x_in.sizes(),
              " on ", x_in.device());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 6 * nb + 4, op, ": params: expected 6 per block and 4 for the ",
              "head = ", 6 * nb + 4, " tensors, got ", params.size());
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == nb + 1, op, ": eps: expected one per block and one for the head = ",
              nb + 1, ", got ", eps.size());
  const int64_t B = x_in.size(0), d = x_in.size(1);
  TORCH_CHECK(n_heads >= 1 && d % n_heads == 0, op, ": n_heads: expected a divisor of d_model ", d, ", got ", n_heads);
  const int64_t D = d / n_heads;
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": d_model / n_heads: expected a head size in (32, 64, 128), got ",
              D);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": params[", i,
                "]: expected a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device(),
                t.is_contiguous() ? "" : " (not contiguous)");
  }
  int64_t n_attn = 0, width = 3 * d;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t kind = kinds[i];
    TORCH_CHECK(kind >= -1 && kind <= 3, op, ": kinds[", i, "]: expected -1 (MLP) or a mask kind 0 .. 3, got ", kind);
    const at::Tensor *g = &params[6 * i], *gb = &params[6 * i + 1], *w1 = &params[6 * i + 2],
                     *b1 = &params[6 * i + 3], *w2 = &params[6 * i + 4], *b2 = &params[6 * i + 5];
    const int64_t hid = kind >= 0 ? 3 * d : b1->numel();
    TORCH_CHECK(g->numel() == d && gb->numel() == d, op, ": block ", i, ": expected norm gain and bias of ", d,
                " elements, got ", g->numel(), " and ", gb->numel());
    TORCH_CHECK(b1->numel() == hid && packed_as(*w1, hid, d), op, ": block ", i, ": expected an in projection of ", d,
                " -> ", hid, " (weight packed [", (hid + 15) / 16, ", ", d, ", 16], bias [", hid, "]), got ",
                w1->sizes(), " and ", b1->sizes());
    const int64_t k2 = kind >= 0 ? d : hid;
    TORCH_CHECK(b2->numel() == d && packed_as(*w2, d, k2), op, ": block ", i, ": expected an out projection of ", k2,
                " -> ", d, " (weight packed [", (d + 15) / 16, ", ", k2, ", 16], bias [", d, "]), got ", w2->sizes(),
                " and ", b2->sizes());
    width = std::max(width, hid);
    n_attn += kind >= 0;
  }
  const at::Tensor &hg = params[6 * nb], &hb = params[6 * nb + 1], &hw = params[6 * nb + 2], &hbias = params[6 * nb + 3];
  TORCH_CHECK(hg.numel() == d && hb.numel() == d && packed_as(hw, hbias.numel(), d), op, ": head: expected norm gain ",
              "and bias of ", d, " elements and a weight packed [ceil(V / 16), ", d, ", 16] for a bias [V], got ",
              hg.sizes(), ", ", hb.sizes(), ", ", hw.sizes(), ", ", hbias.sizes());
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == n_attn && static_cast<int64_t>(v_caches.size()) == n_attn, op,
              ": k_caches, v_caches: expected one per attention block (", n_attn, "), got ", k_caches.size(), " and ",
              v_caches.size());
  TORCH_CHECK(text_len >= 0 && grid_h >= 1 && grid_w >= 1 && kernel >= 1 && kernel % 2 == 1, op,
              ": text_len, grid_h, grid_w, kernel: expected text_len >= 0, a grid of at least 1 x 1 and an odd ",
              "kernel, got ", text_len, ", ", grid_h, ", ", grid_w, ", ", kernel);
  int64_t lmax = -1;
  for (int64_t i = 0; i < 2 * n_attn; ++i) {
    const at::Tensor& c = i < n_attn ? k_caches[i] : v_caches[i - n_attn];
    const char* name = i < n_attn ? "k_caches" : "v_caches";
    const int64_t j = i % n_attn;
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 4 && c.size(0) == B &&
                    c.size(2) == n_heads && c.size(3) == D && c.stride(3) == 1 && c.stride(2) == D,
                op, ": ", name, "[", j, "]: expected a float32 CPU tensor [B, Lmax, H, D] = [", B, ", Lmax, ", n_heads,
                ", ", D, "] with rows of H * D contiguous floats, got ", c.scalar_type(), " ", c.sizes(), " strides ",
                c.strides(), " on ", c.device());
    TORCH_CHECK(lmax < 0 || c.size(1) == lmax, op, ": ", name, "[", j, "]: expected Lmax ", lmax, " like the first cache, got ",
                c.size(1));
    lmax = c.size(1);
  }
  TORCH_CHECK(lmax < 0 || lmax <= text_len + grid_h * grid_w, op, ": k_caches: expected Lmax <= text_len + grid_h * ",
              "grid_w = ", text_len + grid_h * grid_w, ", got ", lmax);
  TORCH_CHECK(n_attn == 0 || (position >= 0 && position < lmax), op, ": position: expected 0 <= position < Lmax = ", lmax,
              ", got ", position);

  const at::Tensor x0 = x_in.contiguous();
  std::vector<float> xs(x0.data_ptr<float>(), x0.data_ptr<float>() + B * d), h(B * d), o(B * d), wide(B * width),
      y(B * d);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int pos = static_cast<int>(position);
  int64_t layer = 0;
  for (int64_t i = 0; i < nb; ++i) {
    const at::Tensor* p = &params[6 * i];
    layer_norm_rows(xs.data(), B, d, p[0].data_ptr<float>(), p[1].data_ptr<float>(), static_cast<float>(eps[i]),
                    h.data());
    linear(h.data(), B, d, p[2], p[3], wide.data());
    const int64_t hid = p[3].numel();
    if (kinds[i] >= 0) {
      const MaskSpec m{static_cast<int>(kinds[i]), static_cast<int>(text_len), static_cast<int>(grid_h),
                       static_cast<int>(grid_w), static_cast<int>(kernel / 2), torus && kinds[i] == kMaskConv,
                       static_cast<int>(text_len + grid_h * grid_w)};
      const at::Tensor &kc = k_caches[layer], &vc = v_caches[layer];
      float* K = kc.data_ptr<float>();
      float* V = vc.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {  // the new row of every sequence's cache
        std::copy_n(wide.data() + b * hid + d, d, K + b * kc.stride(0) + position * kc.stride(1));
        std::copy_n(wide.data() + b * hid + 2 * d, d, V + b * vc.stride(0) + position * vc.stride(1));
      }
      at::parallel_for(0, B * n_heads, 8, [&](int64_t begin, int64_t end) {
        std::vector<float> s(kChunk);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / n_heads, hh = t % n_heads;
          attend_cache(m, dense, pos, hh, static_cast<int>(D), scale, wide.data() + b * hid + hh * D,
                       K + b * kc.stride(0), V + b * vc.stride(0), kc.stride(1), o.data() + b * d + hh * D, s.data());
        }
      });
      linear(o.data(), B, d, p[4], p[5], y.data());
      ++layer;
    } else {
      gelu_inplace(wide.data(), B * hid);
      linear(wide.data(), B, hid, p[4], p[5], y.data());
    }
    for (int64_t j = 0; j < B * d; ++j) xs[j] += y[j];
  }
  layer_norm_rows(xs.data(), B, d, hg.data_ptr<float>(), hb.data_ptr<float>(), static_cast<float>(eps[nb]), h.data());
  at::Tensor logits = at::empty({B, hbias.numel()}, x_in.options());
  linear(h.data(), B, d, hw, hbias, logits.data_ptr<float>());
  return logits;
}

at::Tensor sparse_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       const std::optional<at::Tensor>& position_tensor, int64_t position,
                                       int64_t kind, int64_t text_len, int64_t grid_h, int64_t grid_w, int64_t kernel,
                                       bool torus, double scale) {
  constexpr const char* op = "sparse_decode_attention";
  const DecodeProblem p =
      decode_problem(q_in, k_in, v_in, kind, text_len, grid_h, grid_w, kernel, torus, scale, c10::DeviceType::CPU, op);
  check_position_tensor(position_tensor, q_in, op);
  if (position_tensor.has_value()) position = position_tensor->item<int64_t>();
  at::Tensor out = decode_out_bnhd(q_in);
  if (p.B * p.H * p.n == 0) return out.transpose(1, 2);
  check_position_value(position, p, op);
  const auto unit_last = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  switch (q.scalar_type()) {
    case at::kFloat:
      decode_forward<float>(p, position, q, k, v, out);
      break;
    case at::kHalf:
      decode_forward<c10::Half>(p, position, q, k, v, out);
      break;
    default:
      decode_forward<c10::BFloat16>(p, position, q, k, v, out);
  }
  return out.transpose(1, 2);
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_decode_attention", &dalle_fast::sparse_decode_attention_cpu);
  m.impl("decode_step", &dalle_fast::decode_step_cpu);
}
