// C++ CPU backend of sparse_decode_attention (schema in csrc/ops.cpp, semantics in dalle_fast/ops/decode.py).
//
// One task per (batch, head, query) over at::parallel_for. A task walks the key ranges of its query
// (decode_key_range of attention.h, shared with the CUDA kernel: the text prefix, then the kind's image
// ranges) in chunks of at most kChunk keys: scores s = scale * q . k of the chunk, then the online softmax
// (attention.h's -inf-safe helpers; exp is math.h's exp_finite_or_zero, which vectorises) and
// acc = alpha acc + sum p v. Only the allowed keys are read; rows of the caches past the last query are never
// touched. fp32 rows are read in place (a range's rows are evenly spaced: its step times the row stride is the
// leading dimension); fp16 / bf16 rows are converted to fp32 into a per-task buffer first. The dot products
// and row updates are plain loops compiled for AVX-512, AVX2 and baseline (target_clones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"
#include "dalle_fast/attention.h"
#include "dalle_fast/decode_launch.h"
#include "dalle_fast/math.h"

namespace dalle_fast {
namespace {

constexpr int kChunk = 64;  // keys per chunk of the online softmax

// s[j] = alpha * q . k_j for n rows k_j = k + j * ldk. Each dot product is 16 lane partial sums (fmas over
// d = u, u + 16, ..., in ascending order) added in lane order at the end: the lane loops vectorise (a single
// fma chain would not, without reassociation), and four keys at a time keep four chains in flight.
DF_CLONES void chunk_scores(const float* __restrict__ q, const float* __restrict__ k, int64_t ldk, int n, int D,
                            float alpha, float* __restrict__ s) {
  constexpr int kLanes = 16, kKeys = 4;
  int j = 0;
  for (; j + kKeys <= n; j += kKeys) {
    float part[kKeys][kLanes] = {};
    for (int d0 = 0; d0 < D; d0 += kLanes)
      for (int r = 0; r < kKeys; ++r)
        for (int u = 0; u < kLanes; ++u) part[r][u] = std::fma(q[d0 + u], k[(j + r) * ldk + d0 + u], part[r][u]);
    for (int r = 0; r < kKeys; ++r) {
      float acc = 0.f;
      for (int u = 0; u < kLanes; ++u) acc += part[r][u];
      s[j + r] = acc * alpha;
    }
  }
  for (; j < n; ++j) {
    float part[kLanes] = {};
    for (int d0 = 0; d0 < D; d0 += kLanes)
      for (int u = 0; u < kLanes; ++u) part[u] = std::fma(q[d0 + u], k[j * ldk + d0 + u], part[u]);
    float acc = 0.f;
    for (int u = 0; u < kLanes; ++u) acc += part[u];
    s[j] = acc * alpha;
  }
}

// acc = rescale * acc + sum_j p[j] v_j for n rows v_j = v + j * ldv.
DF_CLONES void chunk_update(float* __restrict__ acc, float rescale, const float* __restrict__ p,
                            const float* __restrict__ v, int64_t ldv, int n, int D) {
  if (rescale != 1.f)
    for (int d = 0; d < D; ++d) acc[d] *= rescale;
  for (int j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* vr = v + j * ldv;
    for (int d = 0; d < D; ++d) acc[d] = std::fma(pj, vr[d], acc[d]);
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

template <typename T>
void decode_forward(const DecodeProblem& p, int64_t position, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, at::Tensor& out) {
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();  // [B, n, H, D] contiguous
  const int D = static_cast<int>(p.D);
  const int slots = decode_slot_count(p.m);
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
      float mx = -INFINITY, l = 0.f;
      for (int slot = 0; slot < slots; ++slot) {
        const KeyRange r = decode_key_range(p.m, pos, slot);
        const int64_t ldk = r.step * k.stride(2), ldv = r.step * v.stride(2);
        for (int c0 = 0; c0 < r.count; c0 += kChunk) {
          const int nc = std::min(kChunk, r.count - c0);
          const int64_t key0 = r.start + static_cast<int64_t>(c0) * r.step;
          int64_t lk, lv;
          const float* kr = rows_f32(kb + key0 * k.stride(2), ldk, nc, D, kbuf.data(), &lk);
          chunk_scores(qf.data(), kr, lk, nc, D, p.scale, s.data());
          float cmax = -INFINITY;
          for (int j = 0; j < nc; ++j) cmax = std::max(cmax, s[j]);
          const float m_new = std::max(mx, cmax);
          const float rescale = online_softmax_rescale(mx, m_new);
          const float sum = chunk_exp(s.data(), nc, online_softmax_shift(m_new));
          l = l * rescale + sum;
          mx = m_new;
          const float* vr = rows_f32(vb + key0 * v.stride(2), ldv, nc, D, vbuf.data(), &lv);
          chunk_update(acc.data(), rescale, s.data(), vr, lv, nc, D);
        }
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;  // every query sees itself: l > 0
      T* orow = O + ((b * p.n + t) * p.H + h) * D;
      for (int d = 0; d < D; ++d) orow[d] = from_f32<T>(acc[d] * inv);
    }
  });
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

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) { m.impl("sparse_decode_attention", &dalle_fast::sparse_decode_attention_cpu); }
