// CUDA C++ backend of the dVAE's fused ops: gumbel_quantize_fwd / _bwd, logit_laplace_nll_fwd / _bwd,
// categorical_kl_uniform_fwd / _bwd (schemas in csrc/ops.cpp). Per-element math (Philox, the noise map,
// the online-softmax and KL merges, the loss formulas) comes from dalle_fast/math.h and dalle_fast/dvae.h,
// shared with csrc/cpu/dvae.cpp; this file only maps the work onto threads. Written to be simple and
// checkable (it has not run on a GPU yet): plain shared-memory tiled GEMMs, no tensor cores.
//
// gumbel_quantize: logits x [B, K, S] (contiguous copy), W [C, K] fp32, dout [B, C, S] fp32.
// Element (b, k, s) has element number offset + (b*K + k)*S + s; a thread always handles 4 consecutive
// pixels s0..s0+3 of one code row (s0 % 4 == 0): one Philox call when offset % 4 == 0 and S % 4 == 0,
// else two (gumbel_quad), so all lanes serve.
//   1. _quantize_stats_kernel   per pixel lse = logsumexp_k z and the argmax of x + g. Block 16 x 16
//      threads: 16 pixel quads (64 pixels) x 16 slices of K; the 16 partial states of a pixel are merged
//      through shared memory in a fixed order.
//   2. _quantize_out_kernel     out_b = W @ Y_b + bias (Y = exp(z - lse) recomputed per 16-code chunk into
//      shared memory): a 64 x 64 output tile per block, 256 threads with 4 x 4 outputs each.
//      hard: _quantize_gather_kernel, out = W[:, idx] + bias.
//   3. _quantize_g_kernel       G = W^T @ dout per [64 codes x 64 pixels] tile, then with y recomputed:
//      MODE 0 the tile's partial t = sum_k y G per pixel (one row per code tile, summed in a fixed order by
//      _sum_partials_kernel), MODE 1 dx = (1/tau) y (G - t).
//   4. _quantize_dw_kernel      dW = sum_b dout_b @ Y_b^T per [64 channels x 64 codes] tile, walking every
//      pixel in chunks of 16 (hard: Y is the one-hot of the saved argmax). Deterministic.
// The relaxed one-hots exist only as [16 x 64] shared-memory tiles.
// Losses: one thread per element (NLL; block partial sums for the reductions, added in fp64) and one thread
// per softmax row (KL, rows along K with stride inner: coalesced for the dVAE's dim=1 layout).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <tuple>
#include <vector>

#include "dalle_fast/dvae.h"
#include "dalle_fast/launch.h"
#include "dalle_fast/math.h"

#include "dalle_fast/device_check.h"

namespace dalle_fast {
namespace {

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Noise of the element numbers n0 .. n0+3 (any n0): one Philox call when n0 % 4 == 0, else two.
__device__ __forceinline__ void noise_quad(uint64_t seed, uint64_t n0, float g[4]) {
  const uint64_t c = n0 >> 2;
  const unsigned sh = static_cast<unsigned>(n0 & 3);
  const Philox4 a = philox_block(seed, c);
  if (sh == 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) g[e] = gumbel_from_uint32(a.x[e]);
    return;
  }
  const Philox4 b = philox_block(seed, c + 1);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const unsigned l = sh + e;
    const uint32_t bits = l < 4 ? (l == 1 ? a.x[1] : l == 2 ? a.x[2] : a.x[3])
                                : (l == 4 ? b.x[0] : l == 5 ? b.x[1] : b.x[2]);
    g[e] = gumbel_from_uint32(bits);
  }
}

struct QArgs {
  int64_t B, K, S, C;
  uint64_t seed;
  int64_t offset;
  float inv_tau;
};

// z of the 4 pixels s0..s0+3 of code k in image b (pixels >= S get -inf); v = x + g (for the argmax).
template <typename T>
__device__ __forceinline__ void scores_quad(const T* __restrict__ x, const QArgs& a, int64_t b, int64_t k, int64_t s0,
                                            float v[4], float z[4]) {
  float g[4];
  noise_quad(a.seed, static_cast<uint64_t>(a.offset + (b * a.K + k) * a.S + s0), g);
  const T* row = x + (b * a.K + k) * a.S;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const bool in = s0 + e < a.S;
    v[e] = in ? ld(row, s0 + e) + g[e] : -INFINITY;
    z[e] = v[e] * a.inv_tau;
  }
}

// ---- 1. per-pixel statistics -----------------------------------------------------------------------

constexpr int kQX = 16, kQY = 16;  // pixel quads x K slices

template <typename T>
__global__ void __launch_bounds__(kQX* kQY) _quantize_stats_kernel(const T* __restrict__ x, QArgs a,
                                                                   float* __restrict__ lse, int64_t* __restrict__ idx) {
  __shared__ SoftmaxStats st_sh[kQY][kQX][4];
  __shared__ ArgMaxState am_sh[kQY][kQX][4];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tiles = (a.S + 4 * kQX - 1) / (4 * kQX);
  const int64_t b = blockIdx.x / tiles;
  const int64_t s0 = (blockIdx.x % tiles) * (4 * kQX) + 4 * tx;
  SoftmaxStats st[4];
  ArgMaxState am[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    st[e] = softmax_stats_init();
    am[e] = argmax_init();
  }
  if (s0 < a.S) {
    for (int64_t k = ty; k < a.K; k += kQY) {
      float v[4], z[4];
      scores_quad(x, a, b, k, s0, v, z);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        st[e] = softmax_stats_combine(st[e], softmax_stats_of(z[e], 0.f));
        am[e] = argmax_combine(am[e], ArgMaxState{v[e], k});
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    st_sh[ty][tx][e] = st[e];
    am_sh[ty][tx][e] = am[e];
  }
  __syncthreads();
  if (ty == 0 && s0 < a.S) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      SoftmaxStats acc = st_sh[0][tx][e];
      ArgMaxState best = am_sh[0][tx][e];
      for (int q = 1; q < kQY; ++q) {
        acc = softmax_stats_combine(acc, st_sh[q][tx][e]);
        best = argmax_combine(best, am_sh[q][tx][e]);
      }
      if (s0 + e < a.S) {
        lse[b * a.S + s0 + e] = (acc.m == -INFINITY ? 0.f : acc.m) + logf(acc.s);
        if (idx) idx[b * a.S + s0 + e] = best.i;
      }
    }
  }
}

// ---- shared GEMM tile machinery: 64 x 64 outputs, 256 threads (16 x 16), 4 x 4 outputs a thread --------

constexpr int kT = 64, kR = 16, kThreads = 256;

// acc[i][j] += sum_r As[r][ty*4 + i] * Bs[r][tx*4 + j]
__device__ __forceinline__ void mma_tile(const float (&As)[kR][kT], const float (&Bs)[kR][kT], float (&acc)[4][4],
                                         int tx, int ty) {
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      av[i] = As[r][ty * 4 + i];
      bv[i] = Bs[r][tx * 4 + i];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// Y[k0 + r][s0 + c] = exp(z - lse) for r < 16, c < 64 (thread t: row t / 16, pixel quad t % 16); 0 outside.
template <typename T>
__device__ __forceinline__ void load_y_rows(const T* __restrict__ x, const QArgs& a, const float* __restrict__ lse,
                                            int64_t b, int64_t k0, int64_t s_base, float (&Ys)[kR][kT], int t) {
  const int r = t / 16, q = t % 16;
  const int64_t k = k0 + r, s0 = s_base + 4 * q;
  float y[4] = {0.f, 0.f, 0.f, 0.f};
  if (k < a.K && s0 < a.S) {
    float v[4], z[4];
    scores_quad(x, a, b, k, s0, v, z);
#pragma unroll
    for (int e = 0; e < 4; ++e) y[e] = s0 + e < a.S ? expf(z[e] - lse[b * a.S + s0 + e]) : 0.f;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) Ys[r][4 * q + e] = y[e];
}

// ---- 2. forward output ---------------------------------------------------------------------------------

// Grid (B * cdiv(S, 64), cdiv(C, 64)); out [B, C, S] in T.
template <typename T>
__global__ void __launch_bounds__(kThreads) _quantize_out_kernel(const T* __restrict__ x, const float* __restrict__ W,
                                                                 const float* __restrict__ bias, QArgs a,
                                                                 const float* __restrict__ lse, T* __restrict__ out) {
  __shared__ float As[kR][kT];  // W^T chunk: [k][c]
  __shared__ float Ys[kR][kT];  // [k][pixel]
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t tiles = (a.S + kT - 1) / kT;
  const int64_t b = blockIdx.x / tiles, s_base = (blockIdx.x % tiles) * kT, c_base = int64_t(blockIdx.y) * kT;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += kR) {
    for (int i = t; i < kR * kT; i += kThreads) {
      const int r = i / kT, c = i % kT;
      As[r][c] = (k0 + r < a.K && c_base + c < a.C) ? W[(c_base + c) * a.K + k0 + r] : 0.f;
    }
    load_y_rows(x, a, lse, b, k0, s_base, Ys, t);
    __syncthreads();
    mma_tile(As, Ys, acc, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c_base + ty * 4 + i;
    if (c >= a.C) continue;
    const float bc = bias ? bias[c] : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t s = s_base + tx * 4 + j;
      if (s < a.S) out[(b * a.C + c) * a.S + s] = static_cast<T>(acc[i][j] + bc);
    }
  }
}

template <typename T>
__global__ void _quantize_gather_kernel(const float* __restrict__ W, const float* __restrict__ bias, QArgs a,
                                        const int64_t* __restrict__ idx, T* __restrict__ out) {
  const int64_t n = a.B * a.C * a.S;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = i % a.S, c = (i / a.S) % a.C, b = i / (a.S * a.C);
    const int64_t k = idx[b * a.S + s];
    DF_DEVICE_CHECK(k >= 0 && k < a.K);
    out[i] = static_cast<T>(W[c * a.K + k] + (bias ? bias[c] : 0.f));
  }
}

// ---- 3. logits gradient --------------------------------------------------------------------------------

// Grid (B * cdiv(S, 64), cdiv(K, 64)). G tile [64 codes][64 pixels] = W^T dout; then MODE 0: partial_t
// [cdiv(K, 64), B, S] gets sum over the tile's codes of y G; MODE 1: dx = inv_tau y (G - t).
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) _quantize_g_kernel(const T* __restrict__ x, const float* __restrict__ W,
                                                               const float* __restrict__ dout, QArgs a,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ t_sum,
                                                               float* __restrict__ partial_t, T* __restrict__ dx) {
  __shared__ float As[kR][kT];  // [c][k]
  __shared__ float Ds[kR][kT];  // [c][pixel]
  __shared__ float red[16][kT];
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t tiles = (a.S + kT - 1) / kT;
  const int64_t b = blockIdx.x / tiles, s_base = (blockIdx.x % tiles) * kT, k_base = int64_t(blockIdx.y) * kT;
  float acc[4][4] = {};
  for (int64_t c0 = 0; c0 < a.C; c0 += kR) {
    for (int i = t; i < kR * kT; i += kThreads) {
      const int r = i / kT, j = i % kT;
      const bool c_in = c0 + r < a.C;
      As[r][j] = (c_in && k_base + j < a.K) ? W[(c0 + r) * a.K + k_base + j] : 0.f;
      Ds[r][j] = (c_in && s_base + j < a.S) ? dout[(b * a.C + c0 + r) * a.S + s_base + j] : 0.f;
    }
    __syncthreads();
    mma_tile(As, Ds, acc, tx, ty);
    __syncthreads();
  }
  // The thread's outputs: codes k_base + ty*4 + i, pixels s0 .. s0+3 (a quad).
  const int64_t s0 = s_base + tx * 4;
  float colsum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t k = k_base + ty * 4 + i;
    if (k >= a.K || s0 >= a.S) continue;
    float v[4], z[4];
    scores_quad(x, a, b, k, s0, v, z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (s0 + j >= a.S) continue;
      const float y = expf(z[j] - lse[b * a.S + s0 + j]);
      if (MODE == 0) {
        colsum[j] += y * acc[i][j];
      } else {
        dx[(b * a.K + k) * a.S + s0 + j] = static_cast<T>(a.inv_tau * y * (acc[i][j] - t_sum[b * a.S + s0 + j]));
      }
    }
  }
  if (MODE == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) red[ty][tx * 4 + j] = colsum[j];
    __syncthreads();
    if (t < kT) {
      float sum = 0.f;
      for (int q = 0; q < 16; ++q) sum += red[q][t];  // fixed order: deterministic
      const int64_t s = s_base + t;
      if (s < a.S) partial_t[(int64_t(blockIdx.y) * a.B + b) * a.S + s] = sum;
    }
  }
}

// t[i] = sum_j partial[j][i] over n_part rows, in order.
__global__ void _sum_partials_kernel(const float* __restrict__ partial, int64_t n_part, int64_t n,
                                     float* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t j = 0; j < n_part; ++j) s += partial[j * n + i];
    out[i] = s;
  }
}

// ---- 4. codebook gradient ------------------------------------------------------------------------------

// Grid (cdiv(C, 64), cdiv(K, 64)); dW [C, K] fp32.
template <typename T, bool HARD>
__global__ void __launch_bounds__(kThreads) _quantize_dw_kernel(const T* __restrict__ x, const float* __restrict__ dout,
                                                                QArgs a, const float* __restrict__ lse,
                                                                const int64_t* __restrict__ idx,
                                                                float* __restrict__ dW) {
  __shared__ float Ds[kR][kT];  // [pixel][c]
  __shared__ float Ys[kR][kT];  // [pixel][k]
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t c_base = int64_t(blockIdx.x) * kT, k_base = int64_t(blockIdx.y) * kT;
  float acc[4][4] = {};
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t p0 = 0; p0 < a.S; p0 += kR) {
      for (int i = t; i < kR * kT; i += kThreads) {
        const int r = i / kT, c = i % kT;
        Ds[r][c] = (p0 + r < a.S && c_base + c < a.C) ? dout[(b * a.C + c_base + c) * a.S + p0 + r] : 0.f;
      }
      // Y^T chunk: thread t handles code k_base + t / 4 and pixels p0 + 4 * (t % 4) .. +3.
      {
        const int kk = t / 4, q = t % 4;
        const int64_t k = k_base + kk, s0 = p0 + 4 * q;
        float y[4] = {0.f, 0.f, 0.f, 0.f};
        if (k < a.K && s0 < a.S) {
          if (HARD) {
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] = (s0 + e < a.S && idx[b * a.S + s0 + e] == k) ? 1.f : 0.f;
          } else {
            float v[4], z[4];
            scores_quad(x, a, b, k, s0, v, z);
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] = s0 + e < a.S ? expf(z[e] - lse[b * a.S + s0 + e]) : 0.f;
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) Ys[4 * q + e][kk] = y[e];
      }
      __syncthreads();
      mma_tile(Ds, Ys, acc, tx, ty);
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c_base + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k_base + tx * 4 + j;
      if (c < a.C && k < a.K) dW[c * a.K + k] = acc[i][j];
    }
  }
}

// ---- losses --------------------------------------------------------------------------------------------

constexpr int kLossThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kLossThreads) _nll_fwd_kernel(const T* __restrict__ x, const T* __restrict__ mu,
                                                                const T* __restrict__ lb, int64_t n,
                                                                float* __restrict__ out, float* __restrict__ partial) {
  __shared__ float red[kLossThreads];
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float xv = ld(x, i), b = ld(lb, i);
    const float v = laplace_nll_value(logf(xv), log1pf(-xv), ld(mu, i), b, expf(-b));
    if (out) out[i] = v;
    acc += v;
  }
  if (partial) {
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int w = kLossThreads / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
  }
}

template <typename T>
__global__ void _nll_bwd_kernel(const float* __restrict__ g, float g_scale, bool g_scalar, const T* __restrict__ x,
                                const T* __restrict__ mu, const T* __restrict__ lb, int64_t n, T* __restrict__ dx,
                                T* __restrict__ dmu, T* __restrict__ dlb) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float xv = ld(x, i), b = ld(lb, i);
    const float gi = g_scalar ? g[0] * g_scale : g[i];
    float a, m, l;
    laplace_nll_grads(xv, logf(xv), log1pf(-xv), ld(mu, i), expf(-b), gi, &a, &m, &l);
    dx[i] = static_cast<T>(a);
    dmu[i] = static_cast<T>(m);
    dlb[i] = static_cast<T>(l);
  }
}

// One thread per row r = o * inner + i; stats [2, R]: lse, negent.
template <typename T>
__global__ void _kl_fwd_kernel(const T* __restrict__ x, int64_t outer, int64_t K, int64_t inner,
                               float* __restrict__ stats) {
  const int64_t R = outer * inner;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < R; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = r / inner, i = r % inner;
    const T* row = x + o * K * inner + i;
    KLStats st = kl_stats_init();
    for (int64_t k = 0; k < K; ++k) {
      const float l = ld(row, k * inner);
      st = kl_stats_combine(st, KLStats{l, l == -INFINITY ? 0.f : 1.f, 0.f});
    }
    float lse, neg;
    kl_finish(KLStats{st.m == -INFINITY ? 0.f : st.m, st.s, st.u}, logf(st.s), &lse, &neg);
    stats[r] = lse;
    stats[R + r] = neg;
  }
}

template <typename T>
__global__ void _kl_bwd_kernel(const T* __restrict__ x, const float* __restrict__ stats, const float* __restrict__ g,
                               int64_t outer, int64_t K, int64_t inner, T* __restrict__ dx) {
  const int64_t R = outer * inner, n = R * K;
  for (int64_t f = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; f < n; f += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = f % inner, o = f / (K * inner), r = o * inner + i;
    const float l = ld(x, f), lse = stats[r];
    dx[f] = static_cast<T>(kl_grad(l, lse, stats[R + r], expf(l - lse), g[r]));
  }
}

// ---- host side -----------------------------------------------------------------------------------------

constexpr int64_t kMaxGrid = 132 * 32;

void check_cuda(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda(), op, ": ", arg, ": expected a CUDA tensor (the cuda backend), got device ", t.device());
}

void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction: expected 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxGrid)));
}

#define DF_DISPATCH(st, name, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, name, __VA_ARGS__)

QArgs make_qargs(const at::Tensor& logits, int64_t C, double tau, int64_t seed, int64_t offset) {
  int64_t S = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) S *= logits.size(d);
  return QArgs{logits.size(0), logits.size(1), S, C, static_cast<uint64_t>(seed), offset,
               static_cast<float>(1.0 / tau)};
}

void check_quantize(const at::Tensor& logits, const at::Tensor& weight, double tau, int64_t offset, const char* op) {
  check_cuda(logits, op, "logits");
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK(logits.dim() >= 2, op, ": logits: expected [B, K, *spatial], got shape ", logits.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == logits.size(1), op, ": weight: expected [C, ", logits.size(1),
              "] (K = logits.size(1)), got shape ", weight.sizes());
  TORCH_CHECK(weight.device() == logits.device(), op, ": weight: expected a tensor on ", logits.device(), ", got ",
              weight.device());
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
}

std::vector<int64_t> out_shape(const at::Tensor& logits, int64_t C) {
  std::vector<int64_t> s(logits.sizes().begin(), logits.sizes().end());
  s[1] = C;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_quantize_fwd_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& weight,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       double tau, bool hard, int64_t seed,
                                                                       int64_t offset) {
  constexpr const char* op = "gumbel_quantize_fwd";
  check_quantize(logits, weight, tau, offset, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t C = weight.size(0);
  const QArgs a = make_qargs(logits, C, tau, seed, offset);
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->device() == logits.device(), op,
                ": bias: expected shape [", C, "] on ", logits.device(), ", got ", bias->sizes(), " on ",
                bias->device());
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty(out_shape(logits, C), logits.options());
  at::Tensor lse = at::empty({a.B, a.S}, logits.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({hard ? a.B : 0, hard ? a.S : 0}, logits.options().dtype(at::kLong));
  if (out.numel() == 0 || a.K == 0) {
    if (out.numel()) {
      if (b32.defined()) out.copy_(b32.view({1, C, 1}).expand({a.B, C, a.S}).reshape(out.sizes()));
      else out.zero_();
    }
    return {out, lse, idx};
  }
  const at::Tensor x = logits.contiguous();
  const at::Tensor W = weight.to(at::kFloat).contiguous();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  DF_DISPATCH(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t stat_tiles = a.B * ((a.S + 4 * kQX - 1) / (4 * kQX));
    _quantize_stats_kernel<scalar_t><<<static_cast<unsigned>(stat_tiles), dim3(kQX, kQY), 0, stream>>>(
        xp, a, lse.data_ptr<float>(), hard ? idx.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (hard) {
      _quantize_gather_kernel<scalar_t><<<grid_for(out.numel(), 256), 256, 0, stream>>>(
          W.data_ptr<float>(), bp, a, idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>());
    } else {
      const dim3 grid(static_cast<unsigned>(a.B * ((a.S + kT - 1) / kT)), static_cast<unsigned>((C + kT - 1) / kT));
      _quantize_out_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(xp, W.data_ptr<float>(), bp, a,
                                                                    lse.data_ptr<float>(), out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, idx};
}

std::tuple<at::Tensor, at::Tensor> gumbel_quantize_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                             const at::Tensor& weight, const at::Tensor& lse,
                                                             const at::Tensor& idx, double tau, bool hard,
                                                             int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_quantize_bwd";
  check_quantize(logits, weight, tau, offset, op);
  check_cuda(grad, op, "grad");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t C = weight.size(0);
  const QArgs a = make_qargs(logits, C, tau, seed, offset);
  TORCH_CHECK(grad.is_floating_point() && grad.sizes() == at::IntArrayRef(out_shape(logits, C)), op,
              ": grad: expected a floating-point tensor of shape ", at::IntArrayRef(out_shape(logits, C)), ", got ",
              grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == a.B * a.S && lse.device() == logits.device(), op,
              ": lse: expected fp32 [", a.B, ", ", a.S, "] on ", logits.device(), ", got ", lse.sizes());
  TORCH_CHECK(!hard || (idx.scalar_type() == at::kLong && idx.numel() == a.B * a.S), op, ": idx: expected int64 [",
              a.B, ", ", a.S, "] in hard mode, got ", idx.sizes());
  at::Tensor dx = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dW = at::zeros({C, a.K}, logits.options().dtype(at::kFloat));
  if (logits.numel() == 0 || C == 0) return {dx.zero_(), dW.to(weight.scalar_type())};
  const at::Tensor x = logits.contiguous();
  const at::Tensor W = weight.to(at::kFloat).contiguous();
  const at::Tensor dout = grad.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor idx_c = hard ? idx.contiguous() : idx;
  const int64_t k_tiles = (a.K + kT - 1) / kT;
  at::Tensor partial = at::empty({k_tiles, a.B, a.S}, logits.options().dtype(at::kFloat));
  at::Tensor t_sum = at::empty({a.B, a.S}, logits.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  DF_DISPATCH(x.scalar_type(), op, [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const dim3 grid(static_cast<unsigned>(a.B * ((a.S + kT - 1) / kT)), static_cast<unsigned>(k_tiles));
    _quantize_g_kernel<scalar_t, 0><<<grid, kThreads, 0, stream>>>(xp, W.data_ptr<float>(), dout.data_ptr<float>(), a,
                                                                   lse_c.data_ptr<float>(), nullptr,
                                                                   partial.data_ptr<float>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _sum_partials_kernel<<<grid_for(a.B * a.S, 256), 256, 0, stream>>>(partial.data_ptr<float>(), k_tiles, a.B * a.S,
                                                                        t_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _quantize_g_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(xp, W.data_ptr<float>(), dout.data_ptr<float>(), a,
                                                                   lse_c.data_ptr<float>(), t_sum.data_ptr<float>(),
                                                                   nullptr, dx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 wgrid(static_cast<unsigned>((C + kT - 1) / kT), static_cast<unsigned>(k_tiles));
    if (hard) {
      _quantize_dw_kernel<scalar_t, true><<<wgrid, kThreads, 0, stream>>>(
          xp, dout.data_ptr<float>(), a, lse_c.data_ptr<float>(), idx_c.data_ptr<int64_t>(), dW.data_ptr<float>());
    } else {
      _quantize_dw_kernel<scalar_t, false><<<wgrid, kThreads, 0, stream>>>(
          xp, dout.data_ptr<float>(), a, lse_c.data_ptr<float>(), nullptr, dW.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dW.to(weight.scalar_type())};
}

void check_triple(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lb, const char* op) {
  check_cuda(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(mu.scalar_type() == x.scalar_type() && lb.scalar_type() == x.scalar_type(), op,
              ": mu, log_b: expected the dtype of x (", x.scalar_type(), ")");
  TORCH_CHECK(mu.sizes() == x.sizes() && lb.sizes() == x.sizes(), op, ": mu, log_b: expected the shape of x ",
              x.sizes(), ", got ", mu.sizes(), " and ", lb.sizes());
  TORCH_CHECK(mu.device() == x.device() && lb.device() == x.device(), op,
              ": mu, log_b: expected tensors on the device of x (", x.device(), ")");
}

at::Tensor logit_laplace_nll_fwd_cuda(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& log_b,
                                      int64_t reduction) {
  constexpr const char* op = "logit_laplace_nll_fwd";
  check_triple(x, mu, log_b, op);
  check_reduction(reduction, op);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = mu.contiguous(), bc = log_b.contiguous();
  const int64_t n = x.numel();
  const unsigned grid = grid_for(n, kLossThreads);
  at::Tensor out = reduction == kReduceNone ? at::empty(x.sizes(), x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor partial = at::zeros({grid}, x.options().dtype(at::kFloat));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    DF_DISPATCH(x.scalar_type(), op, [&] {
      _nll_fwd_kernel<scalar_t><<<grid, kLossThreads, 0, stream>>>(
          xc.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), n,
          out.defined() ? out.data_ptr<float>() : nullptr, out.defined() ? nullptr : partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (reduction == kReduceNone) return out;
  at::Tensor total = partial.to(at::kDouble).sum();
  if (reduction == kReduceMean) total = total / static_cast<double>(n);
  return total.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logit_laplace_nll_bwd_cuda(const at::Tensor& grad,
                                                                          const at::Tensor& x, const at::Tensor& mu,
                                                                          const at::Tensor& log_b,
                                                                          int64_t reduction) {
  constexpr const char* op = "logit_laplace_nll_bwd";
  check_triple(x, mu, log_b, op);
  check_reduction(reduction, op);
  check_cuda(grad, op, "grad");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (reduction == kReduceNone) {
    TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad: expected the shape of x ", x.sizes(), ", got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad: expected a scalar for a reduced loss, got shape ", grad.sizes());
  }
  const at::Tensor xc = x.contiguous(), mc = mu.contiguous(), bc = log_b.contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(x.sizes(), xc.options()), dmu = at::empty(x.sizes(), xc.options()),
             dlb = at::empty(x.sizes(), xc.options());
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const float scale = reduction == kReduceMean ? static_cast<float>(1.0 / static_cast<double>(n)) : 1.f;
    DF_DISPATCH(x.scalar_type(), op, [&] {
      _nll_bwd_kernel<scalar_t><<<grid_for(n, 256), 256, 0, stream>>>(
          g.data_ptr<float>(), scale, reduction != kReduceNone, xc.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(),
          bc.data_ptr<scalar_t>(), n, dx.data_ptr<scalar_t>(), dmu.data_ptr<scalar_t>(), dlb.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, dmu, dlb};
}

std::vector<int64_t> shape_without(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (d != dim) s.push_back(t.size(d));
  return s;
}

std::tuple<at::Tensor, at::Tensor> categorical_kl_uniform_fwd_cuda(const at::Tensor& logits, int64_t dim,
                                                                   int64_t reduction) {
  constexpr const char* op = "categorical_kl_uniform_fwd";
  check_cuda(logits, op, "logits");
  check_float_dtype(logits, op, "logits");
  check_logits(logits, dim, op);
  check_reduction(reduction, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const ReductionView v = reduction_view(logits, dim);
  const int64_t R = v.outer * v.inner;
  at::Tensor stats = at::empty({2, R}, logits.options().dtype(at::kFloat));
  if (R > 0 && v.K > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    DF_DISPATCH(logits.scalar_type(), op, [&] {
      _kl_fwd_kernel<scalar_t><<<grid_for(R, 128), 128, 0, stream>>>(v.t.data_ptr<scalar_t>(), v.outer, v.K, v.inner,
                                                                     stats.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    stats.fill_(NAN);
  }
  const at::Tensor kl = (stats[1] + std::log(static_cast<double>(v.K))).view(shape_without(logits, dim));
  if (reduction == kReduceNone) return {kl, stats};
  return {reduction == kReduceMean ? kl.mean() : kl.sum(), stats};
}

at::Tensor categorical_kl_uniform_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats,
                                           int64_t dim, int64_t reduction) {
  constexpr const char* op = "categorical_kl_uniform_bwd";
  check_cuda(logits, op, "logits");
  check_float_dtype(logits, op, "logits");
  check_logits(logits, dim, op);
  check_reduction(reduction, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const ReductionView v = reduction_view(logits, dim);
  const int64_t R = v.outer * v.inner;
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 * R, op, ": stats: expected fp32 [2, ", R,
              "], got ", stats.sizes());
  TORCH_CHECK(reduction == kReduceNone ? grad.numel() == R : grad.numel() == 1, op, ": grad: expected ",
              reduction == kReduceNone ? R : 1, " elements, got shape ", grad.sizes());
  at::Tensor g = grad.to(at::kFloat).reshape({-1});
  if (reduction == kReduceMean) g = g / static_cast<double>(R);
  g = g.expand({R}).contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor dx = at::empty({v.outer, v.K, v.inner}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    DF_DISPATCH(logits.scalar_type(), op, [&] {
      _kl_bwd_kernel<scalar_t><<<grid_for(dx.numel(), 256), 256, 0, stream>>>(
          v.t.data_ptr<scalar_t>(), st.data_ptr<float>(), g.data_ptr<float>(), v.outer, v.K, v.inner,
          dx.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return dx.view(logits.sizes());
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("gumbel_quantize_fwd", &dalle_fast::gumbel_quantize_fwd_cuda);
  m.impl("gumbel_quantize_bwd", &dalle_fast::gumbel_quantize_bwd_cuda);
  m.impl("logit_laplace_nll_fwd", &dalle_fast::logit_laplace_nll_fwd_cuda);
  m.impl("logit_laplace_nll_bwd", &dalle_fast::logit_laplace_nll_bwd_cuda);
  m.impl("categorical_kl_uniform_fwd", &dalle_fast::categorical_kl_uniform_fwd_cuda);
  m.impl("categorical_kl_uniform_bwd", &dalle_fast::categorical_kl_uniform_bwd_cuda);
}
