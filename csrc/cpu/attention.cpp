// C++ CPU backend of the block-sparse DALL-E attention: sparse_attention_fwd and sparse_attention_bwd
// (schemas in csrc/ops.cpp, semantics in DESIGN section 4 and csrc/include/dalle_fast/attention.h).
//
// Work. The tile layout (CSR arrays from dalle_fast.masks.tile_layout) lists, per query tile of the
// processing order, the key tiles to visit and whether each needs the element mask. Consecutive visited
// tiles (j, j+1, ...) are merged into one span of at most kSpan rows, so that one GEMM call covers them (the
// text prefix of every query tile is such a run): the tiles of a span stay the unit of masking
// (processing_allowed_points of attention.h, on partial tiles only), the span only that of the GEMM calls.
// Skipped tiles are never touched; no [L, L] buffer exists, only per-thread tile buffers ([span, block]
// scores, [span, D] operands).
//   forward   per (batch, head, query tile), over key spans: S^T = scale * K Q^T, the element mask, the
//             online softmax on vectors of queries (attention.h's -inf-safe helpers), acc += P V; at the end
//             out = acc / l and lse = m + log(l).
//   backward  FlashAttention-2 without atomics (deterministic), one task list in one parallel region:
//             dK, dV  per (batch, head, key tile), over spans of the query tiles that visit it (q_* arrays):
//                     P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q;
//             dQ      per (batch, head, query tile), over key spans: the same P and dS, transposed,
//                     dQ += dS K;
//             each task computes delta = rowsum(dO * out) of its own query rows; dQ and dK take the softmax
//             scale at the end. The tasks are handed out dynamically to torch's threads (parallel_tasks).
// Everything accumulates in fp32; fp16 and bf16 rows are converted to fp32 when they are packed. P and dS
// stay fp32.
//
// Rows. Processing position p lives at raster row processing_row(p) of q, k, v, out (a column layer runs on
// the column-major image order); rows at or past L are absent: never loaded (packed as zeros), never
// stored, masked (the layout marks their tiles partial). A span whose rows are evenly spaced and present
// is read in place when the tensor is fp32 (its row stride is the GEMM's leading dimension: the text
// prefix, every span of the raster kinds, a column's image rows); other spans are packed. Only the task's
// own tile is transposed (Q^T in the forward and dQ, K^T and V^T in dK/dV): the scores of a span are
// computed against it, so no span is ever repacked.
//
// GEMMs. Our own register-blocked micro-kernels, AVX-512 (8 x 32 for the score GEMMs, 4 x 64 for the
// accumulating ones) or AVX2 + FMA (6 x 16, 3 x 32), with portable loops elsewhere; all give each element as
// fused multiply-add chains in a fixed order, which the backward relies on (see "Tile GEMMs").
// torch's cpublas::gemm, which ATen's own CPU flash attention uses, is not exported to extensions; the
// tiles are also too small for a BLAS call's fixed cost. The exp of the softmax is math.h's
// exp_finite_or_zero on 16 lanes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "dalle_fast/attention.h"
#include "dalle_fast/math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"

namespace dalle_fast {
namespace {

constexpr int kSpan = 256;  // most keys (forward, dQ) or queries (dK/dV) merged into one span
constexpr int kMaxBlock = 1024;
constexpr int kChunk = 32;  // k per fma chain of gemm_nn

// ------------------------------------------------------------------------------------------------
// Tile GEMMs on fp32, row-major. Every element is one fused multiply-add chain over k in ascending order,
// whatever the tile shapes and the code path (AVX-512, AVX2 or the portable loops):
//   gemm_nt  C[m, n] = alpha * chain_k(A[m, k] * Bt[k, n])   (A [M, K] rows; Bt = B^T packed [K, N])
//   gemm_nn  C[m, n] += sum over chunks of kChunk consecutive k (ascending) of chain_k(A(m, k) * B[k, n])
//            (A(m, k) = A[m * sa_m + k * sa_k]: a matrix or the transpose of one; B [K, N] rows. The chunks
//            keep the error of long sums, e.g. dV of a text key summed over every query, near that of a
//            blocked BLAS instead of growing with one chain of K terms.)
// So a score q.k is bitwise the same in the forward, the dQ pass and the dK/dV pass, whichever of q and k
// is the row operand (fma is symmetric in its factors), and dP = dO.v of a row whose softmax is one-hot
// equals its delta = dO.out (dot_chains, the same chain): the backward of such a row is exact, as eager
// PyTorch's is. Only tiles packed once per task are transposed (Q or K^T of the task's own tile); the
// operands of the spans are read in place.

// Bt[k * ldt + n] = B[n * ldb + k] for B [N, K].
void pack_transposed(int N, int K, const float* B, int64_t ldb, float* Bt, int64_t ldt) {
  constexpr int kBlock = 16;
  for (int n0 = 0; n0 < N; n0 += kBlock)
    for (int k0 = 0; k0 < K; k0 += kBlock)
      for (int n = n0; n < std::min(N, n0 + kBlock); ++n)
        for (int k = k0; k < std::min(K, k0 + kBlock); ++k) Bt[k * ldt + n] = B[n * ldb + k];
}

// Dot products of n row pairs, out[t] = a[t] . b[t], each in the chain order of the GEMMs; 8 rows at a time
// (8 independent chains: a chain alone waits on each fma's latency).
DF_CLONES void dot_chains(const float* a, int64_t lda, const float* b, int64_t ldb, int n, int K, float* out) {
  constexpr int kRows = 8;
  int t = 0;
  for (; t + kRows <= n; t += kRows) {
    float acc[kRows] = {};
    for (int k = 0; k < K; ++k)
      for (int u = 0; u < kRows; ++u) acc[u] = std::fma(a[(t + u) * lda + k], b[(t + u) * ldb + k], acc[u]);
    for (int u = 0; u < kRows; ++u) out[t + u] = acc[u];
  }
  for (; t < n; ++t) {
    float acc = 0.f;
    for (int k = 0; k < K; ++k) acc = std::fma(a[t * lda + k], b[t * ldb + k], acc);
    out[t] = acc;
  }
}

DF_CLONES void gemm_nt_loops(int M, int N, int K, float alpha, const float* A, int64_t lda, const float* Bt,
                             int64_t ldt, float* C, int64_t ldc) {
  for (int m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    for (int n = 0; n < N; ++n) c[n] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float a = A[m * lda + k];
      const float* b = Bt + k * ldt;
      for (int n = 0; n < N; ++n) c[n] = std::fma(a, b[n], c[n]);
    }
    for (int n = 0; n < N; ++n) c[n] *= alpha;
  }
}

DF_CLONES void gemm_nn_loops(int M, int N, int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B,
                             int64_t ldb, float* C, int64_t ldc, float* tmp) {
  for (int m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    for (int k0 = 0; k0 < K; k0 += kChunk) {
      for (int n = 0; n < N; ++n) tmp[n] = 0.f;
      for (int k = k0; k < std::min(K, k0 + kChunk); ++k) {
        const float a = A[m * sa_m + k * sa_k];
        const float* b = B + k * ldb;
        for (int n = 0; n < N; ++n) tmp[n] = std::fma(a, b[n], tmp[n]);
      }
      for (int n = 0; n < N; ++n) c[n] += tmp[n];
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DF_HAVE_AVX512_PATH 1
#define DF_AVX512 __attribute__((target("avx512f")))
#define DF_UNROLL _Pragma("GCC unroll 16")

DF_AVX512 inline __mmask16 lane_mask(int n) {
  return n >= 16 ? 0xFFFF : (n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u));
}

// MR rows x 32 columns (two vectors, masked) of C = alpha * A Bt.
template <int MR>
DF_AVX512 inline void nt_block(int K, float alpha, const float* A, int64_t lda, const float* Bt, int64_t ldt, float* C,
                               int64_t ldc, __mmask16 m0, __mmask16 m1) {
  __m512 acc[MR][2];
  DF_UNROLL for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, Bt + k * ldt);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, Bt + k * ldt + 16);
    DF_UNROLL for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  DF_UNROLL for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, _mm512_mul_ps(acc[r][0], al));
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, _mm512_mul_ps(acc[r][1], al));
  }
}

DF_AVX512 void gemm_nt_avx512(int M, int N, int K, float alpha, const float* A, int64_t lda, const float* Bt,
                              int64_t ldt, float* C, int64_t ldc) {
  constexpr int MR = 8;
  for (int n0 = 0; n0 < N; n0 += 32) {
    const __mmask16 m0 = lane_mask(N - n0), m1 = lane_mask(N - n0 - 16);
    int m = 0;
    for (; m + MR <= M; m += MR) nt_block<MR>(K, alpha, A + m * lda, lda, Bt + n0, ldt, C + m * ldc + n0, ldc, m0, m1);
    for (; m < M; ++m) nt_block<1>(K, alpha, A + m * lda, lda, Bt + n0, ldt, C + m * ldc + n0, ldc, m0, m1);
  }
}

// MR rows x NV vectors (the last one masked) of C += A B.
template <int MR, int NV>
DF_AVX512 inline void nn_block(int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb,
                               float* C, int64_t ldc, __mmask16 last) {
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    __m512 acc[MR][NV];
    DF_UNROLL for (int r = 0; r < MR; ++r) DF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const int k1 = std::min(K, k0 + kChunk);
    for (int k = k0; k < k1; ++k) {
      __m512 b[NV];
      DF_UNROLL for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xFFFF, B + k * ldb + 16 * v);
      DF_UNROLL for (int r = 0; r < MR; ++r) {
        const __m512 a = _mm512_set1_ps(A[r * sa_m + k * sa_k]);
        DF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
      }
    }
    DF_UNROLL for (int r = 0; r < MR; ++r) DF_UNROLL for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : 0xFFFF;
      float* c = C + r * ldc + 16 * v;
      _mm512_mask_storeu_ps(c, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, c), acc[r][v]));
    }
  }
}

template <int MR, int NV>
DF_AVX512 void nn_rows(int M, int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb, float* C,
                       int64_t ldc, __mmask16 last) {
  int m = 0;
  for (; m + MR <= M; m += MR) nn_block<MR, NV>(K, A + m * sa_m, sa_m, sa_k, B, ldb, C + m * ldc, ldc, last);
  for (; m < M; ++m) nn_block<1, NV>(K, A + m * sa_m, sa_m, sa_k, B, ldb, C + m * ldc, ldc, last);
}

DF_AVX512 void gemm_nn_avx512(int M, int N, int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B,
                              int64_t ldb, float* C, int64_t ldc) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    const int nv = std::min(4, (N - n0 + 15) / 16);
    const __mmask16 last = lane_mask(N - n0 - 16 * (nv - 1));
    const float* b = B + n0;
    float* c = C + n0;
    switch (nv) {
      case 1:
        nn_rows<8, 1>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, last);
        break;
      case 2:
        nn_rows<8, 2>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, last);
        break;
      case 3:
        nn_rows<5, 3>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, last);
        break;
      default:
        nn_rows<4, 4>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, last);
    }
  }
}

// exp_finite_or_zero of math.h on 16 lanes, operation for operation (the compiler may contract a multiply
// and an add into an fma here, so the last bit can differ from the portable path).
DF_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-86.f), hi = _mm512_set1_ps(88.f), shift = _mm512_set1_ps(12582912.f);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504089f)), shift);
  const __m512 nf = _mm512_sub_ps(t, shift);
  const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(shift));
  const __m512 r = _mm512_add_ps(_mm512_sub_ps(xc, _mm512_mul_ps(nf, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(nf, _mm512_set1_ps(2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 720.f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 120.f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 24.f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f / 6.f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.f));
  __m512 y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(n, 23)));
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_ps());
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

DF_AVX512 void col_max_avx512(const float* s, int rows, int n, int64_t ld, float* out) {
  for (int c = 0; c < n; c += 16) {
    const __mmask16 mk = lane_mask(n - c);
    __m512 m = _mm512_maskz_loadu_ps(mk, out + c);
    for (int r = 0; r < rows; ++r) m = _mm512_max_ps(m, _mm512_maskz_loadu_ps(mk, s + r * ld + c));
    _mm512_mask_storeu_ps(out + c, mk, m);
  }
}

DF_AVX512 void exp_cols_avx512(float* s, int rows, int n, int64_t ld, const float* shift, float* sum) {
  for (int c = 0; c < n; c += 16) {
    const __mmask16 mk = lane_mask(n - c);
    const __m512 sh = _mm512_maskz_loadu_ps(mk, shift + c);
    __m512 acc = _mm512_maskz_loadu_ps(mk, sum + c);
    for (int r = 0; r < rows; ++r) {
      float* row = s + r * ld + c;
      const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, row), sh));
      _mm512_mask_storeu_ps(row, mk, e);
      acc = _mm512_add_ps(acc, e);
    }
    _mm512_mask_storeu_ps(sum + c, mk, acc);
  }
}

DF_AVX512 void ds_cols_avx512(float* s, const float* dp, int rows, int n, int64_t ld, const float* lse,
                              const float* delta) {
  for (int c = 0; c < n; c += 16) {
    const __mmask16 mk = lane_mask(n - c);
    const __m512 ls = _mm512_maskz_loadu_ps(mk, lse + c), de = _mm512_maskz_loadu_ps(mk, delta + c);
    for (int r = 0; r < rows; ++r) {
      float* row = s + r * ld + c;
      const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, row), ls));
      _mm512_mask_storeu_ps(row, mk, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, dp + r * ld + c), de)));
    }
  }
}

DF_AVX512 void p_rows_avx512(float* s, int rows, int n, int64_t ld, const float* lse) {
  for (int r = 0; r < rows; ++r) {
    const __m512 ls = _mm512_set1_ps(lse[r]);
    for (int c = 0; c < n; c += 16) {
      const __mmask16 mk = lane_mask(n - c);
      float* row = s + r * ld + c;
      _mm512_mask_storeu_ps(row, mk, exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, row), ls)));
    }
  }
}

DF_AVX512 void ds_rows_avx512(float* s, const float* dp, int rows, int n, int64_t ld, const float* delta) {
  for (int r = 0; r < rows; ++r) {
    const __m512 de = _mm512_set1_ps(delta[r]);
    for (int c = 0; c < n; c += 16) {
      const __mmask16 mk = lane_mask(n - c);
      float* row = s + r * ld + c;
      const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, dp + r * ld + c), de);
      _mm512_mask_storeu_ps(row, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, row), g));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The same kernels on 8 lanes for AVX2 + FMA hosts without AVX-512 (AMD before Zen 4, many Intel desktops):
// the same fma chains in the same order, so the GEMMs give the bits of the other two paths. Tails use
// vmaskmov, only on the last partial vector (its store is slow on AMD).
#define DF_AVX2 __attribute__((target("avx2,fma")))

DF_AVX2 inline __m256i lane_mask8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
DF_AVX2 inline __m256 load8(const float* p, int n, __m256i mk) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mk);
}
DF_AVX2 inline void store8(float* p, int n, __m256i mk, __m256 v) {
  if (n >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, mk, v);
}

// MR rows x NV vectors (n valid columns, n <= 8 NV) of C = alpha * A Bt.
template <int MR, int NV>
DF_AVX2 inline void nt_block8(int K, float alpha, const float* A, int64_t lda, const float* Bt, int64_t ldt, float* C,
                              int64_t ldc, int n) {
  const __m256i last = lane_mask8(n - 8 * (NV - 1));
  const int nl = n - 8 * (NV - 1);
  __m256 acc[MR][NV];
  DF_UNROLL for (int r = 0; r < MR; ++r) DF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m256 b[NV];
    DF_UNROLL for (int v = 0; v < NV; ++v) b[v] = v == NV - 1 ? load8(Bt + k * ldt + 8 * v, nl, last)
                                                               : _mm256_loadu_ps(Bt + k * ldt + 8 * v);
    DF_UNROLL for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      DF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  const __m256 al = _mm256_set1_ps(alpha);
  DF_UNROLL for (int r = 0; r < MR; ++r) DF_UNROLL for (int v = 0; v < NV; ++v) {
    const __m256 c = _mm256_mul_ps(acc[r][v], al);
    if (v == NV - 1)
      store8(C + r * ldc + 8 * v, nl, last, c);
    else
      _mm256_storeu_ps(C + r * ldc + 8 * v, c);
  }
}

template <int MR, int NV>
DF_AVX2 void nt_rows8(int M, int K, float alpha, const float* A, int64_t lda, const float* Bt, int64_t ldt, float* C,
                      int64_t ldc, int n) {
  int m = 0;
  for (; m + MR <= M; m += MR) nt_block8<MR, NV>(K, alpha, A + m * lda, lda, Bt, ldt, C + m * ldc, ldc, n);
  for (; m < M; ++m) nt_block8<1, NV>(K, alpha, A + m * lda, lda, Bt, ldt, C + m * ldc, ldc, n);
}

DF_AVX2 void gemm_nt_avx2(int M, int N, int K, float alpha, const float* A, int64_t lda, const float* Bt, int64_t ldt,
                          float* C, int64_t ldc) {
  for (int n0 = 0; n0 < N; n0 += 16) {
    const int n = std::min(16, N - n0);
    if (n > 8)
      nt_rows8<6, 2>(M, K, alpha, A, lda, Bt + n0, ldt, C + n0, ldc, n);
    else
      nt_rows8<8, 1>(M, K, alpha, A, lda, Bt + n0, ldt, C + n0, ldc, n);
  }
}

// MR rows x NV vectors (n valid columns) of C += A B, in chains of kChunk k.
template <int MR, int NV>
DF_AVX2 inline void nn_block8(int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb, float* C,
                              int64_t ldc, int n) {
  const int nl = n - 8 * (NV - 1);
  const __m256i last = lane_mask8(nl);
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    __m256 acc[MR][NV];
    DF_UNROLL for (int r = 0; r < MR; ++r) DF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
    const int k1 = std::min(K, k0 + kChunk);
    for (int k = k0; k < k1; ++k) {
      __m256 b[NV];
      DF_UNROLL for (int v = 0; v < NV; ++v) b[v] = v == NV - 1 ? load8(B + k * ldb + 8 * v, nl, last)
                                                                 : _mm256_loadu_ps(B + k * ldb + 8 * v);
      DF_UNROLL for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(A + r * sa_m + k * sa_k);
        DF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
      }
    }
    DF_UNROLL for (int r = 0; r < MR; ++r) DF_UNROLL for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 8 * v;
      if (v == NV - 1)
        store8(c, nl, last, _mm256_add_ps(load8(c, nl, last), acc[r][v]));
      else
        _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), acc[r][v]));
    }
  }
}

template <int MR, int NV>
DF_AVX2 void nn_rows8(int M, int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb, float* C,
                      int64_t ldc, int n) {
  int m = 0;
  for (; m + MR <= M; m += MR) nn_block8<MR, NV>(K, A + m * sa_m, sa_m, sa_k, B, ldb, C + m * ldc, ldc, n);
  for (; m < M; ++m) nn_block8<1, NV>(K, A + m * sa_m, sa_m, sa_k, B, ldb, C + m * ldc, ldc, n);
}

DF_AVX2 void gemm_nn_avx2(int M, int N, int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb,
                          float* C, int64_t ldc) {
  for (int n0 = 0; n0 < N; n0 += 32) {
    const int n = std::min(32, N - n0);
    const float* b = B + n0;
    float* c = C + n0;
    switch ((n + 7) / 8) {
      case 1:
        nn_rows8<8, 1>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, n);
        break;
      case 2:
        nn_rows8<6, 2>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, n);
        break;
      case 3:
        nn_rows8<4, 3>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, n);
        break;
      default:
        nn_rows8<3, 4>(M, K, A, sa_m, sa_k, b, ldb, c, ldc, n);
    }
  }
}

// exp_finite_or_zero of math.h on 8 lanes, as exp_avx512.
DF_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-86.f), hi = _mm256_set1_ps(88.f), shift = _mm256_set1_ps(12582912.f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 t = _mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504089f)), shift);
  const __m256 nf = _mm256_sub_ps(t, shift);
  const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(shift));
  const __m256 r = _mm256_add_ps(_mm256_sub_ps(xc, _mm256_mul_ps(nf, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(nf, _mm256_set1_ps(2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.f / 720.f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.f / 120.f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.f / 24.f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.f / 6.f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.f));
  __m256 y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(n, 23)));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

DF_AVX2 void col_max_avx2(const float* s, int rows, int n, int64_t ld, float* out) {
  for (int c = 0; c < n; c += 8) {
    const int nc = n - c;
    const __m256i mk = lane_mask8(nc);
    __m256 m = load8(out + c, nc, mk);
    for (int r = 0; r < rows; ++r) m = _mm256_max_ps(m, load8(s + r * ld + c, nc, mk));
    store8(out + c, nc, mk, m);
  }
}

DF_AVX2 void exp_cols_avx2(float* s, int rows, int n, int64_t ld, const float* shift, float* sum) {
  for (int c = 0; c < n; c += 8) {
    const int nc = n - c;
    const __m256i mk = lane_mask8(nc);
    const __m256 sh = load8(shift + c, nc, mk);
    __m256 acc = load8(sum + c, nc, mk);
    for (int r = 0; r < rows; ++r) {
      float* row = s + r * ld + c;
      const __m256 e = exp_avx2(_mm256_sub_ps(load8(row, nc, mk), sh));
      store8(row, nc, mk, e);
      acc = _mm256_add_ps(acc, e);
    }
    store8(sum + c, nc, mk, acc);
  }
}

DF_AVX2 void ds_cols_avx2(float* s, const float* dp, int rows, int n, int64_t ld, const float* lse,
                          const float* delta) {
  for (int c = 0; c < n; c += 8) {
    const int nc = n - c;
    const __m256i mk = lane_mask8(nc);
    const __m256 ls = load8(lse + c, nc, mk), de = load8(delta + c, nc, mk);
    for (int r = 0; r < rows; ++r) {
      float* row = s + r * ld + c;
      const __m256 p = exp_avx2(_mm256_sub_ps(load8(row, nc, mk), ls));
      store8(row, nc, mk, _mm256_mul_ps(p, _mm256_sub_ps(load8(dp + r * ld + c, nc, mk), de)));
    }
  }
}

DF_AVX2 void p_rows_avx2(float* s, int rows, int n, int64_t ld, const float* lse) {
  for (int r = 0; r < rows; ++r) {
    const __m256 ls = _mm256_set1_ps(lse[r]);
    for (int c = 0; c < n; c += 8) {
      const int nc = n - c;
      const __m256i mk = lane_mask8(nc);
      float* row = s + r * ld + c;
      store8(row, nc, mk, exp_avx2(_mm256_sub_ps(load8(row, nc, mk), ls)));
    }
  }
}

DF_AVX2 void ds_rows_avx2(float* s, const float* dp, int rows, int n, int64_t ld, const float* delta) {
  for (int r = 0; r < rows; ++r) {
    const __m256 de = _mm256_set1_ps(delta[r]);
    for (int c = 0; c < n; c += 8) {
      const int nc = n - c;
      const __m256i mk = lane_mask8(nc);
      float* row = s + r * ld + c;
      const __m256 g = _mm256_sub_ps(load8(dp + r * ld + c, nc, mk), de);
      store8(row, nc, mk, _mm256_mul_ps(load8(row, nc, mk), g));
    }
  }
}

// The widest path this CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 the portable loops. DALLE_FAST_CPU_PORTABLE=1
// (read once) forces 0, so that tests can compare the paths.
int simd_level() {
  static const int level = std::getenv("DALLE_FAST_CPU_PORTABLE") != nullptr ? 0
                           : __builtin_cpu_supports("avx512f")                ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                             : 0;
  return level;
}
#define DF_TRY_SIMD(name, ...)                             \
  if (simd_level() == 2) return name##_avx512(__VA_ARGS__); \
  if (simd_level() == 1) return name##_avx2(__VA_ARGS__)
#else
#define DF_TRY_SIMD(name, ...)
#endif

// C = alpha * A B^T for A [M, K] rows and Bt = B^T [K, N] (leading dimension ldt).
void gemm_nt(int M, int N, int K, float alpha, const float* A, int64_t lda, const float* Bt, int64_t ldt, float* C,
             int64_t ldc) {
  if (M == 0 || N == 0) return;
  DF_TRY_SIMD(gemm_nt, M, N, K, alpha, A, lda, Bt, ldt, C, ldc);
  gemm_nt_loops(M, N, K, alpha, A, lda, Bt, ldt, C, ldc);
}

// C += A B for A(m, k) = A[m * sa_m + k * sa_k] and B [K, N] rows.
void gemm_nn(int M, int N, int K, const float* A, int64_t sa_m, int64_t sa_k, const float* B, int64_t ldb, float* C,
             int64_t ldc) {
  if (M == 0 || N == 0) return;
  DF_TRY_SIMD(gemm_nn, M, N, K, A, sa_m, sa_k, B, ldb, C, ldc);
  std::vector<float> tmp(N);
  gemm_nn_loops(M, N, K, A, sa_m, sa_k, B, ldb, C, ldc, tmp.data());
}

// ------------------------------------------------------------------------------------------------
// Element-wise passes over score tiles s [rows, n] (leading dimension ld). "cols": one query per column
// (vectors of queries), "rows": one query per row.

// out[c] = max(out[c], max_r s[r, c]).
void col_max(const float* s, int rows, int n, int64_t ld, float* out) {
  DF_TRY_SIMD(col_max, s, rows, n, ld, out);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c) out[c] = s[r * ld + c] > out[c] ? s[r * ld + c] : out[c];
}

// s = exp(s - shift[c]); sum[c] += the column's sum (rows in order).
void exp_cols(float* s, int rows, int n, int64_t ld, const float* shift, float* sum) {
  DF_TRY_SIMD(exp_cols, s, rows, n, ld, shift, sum);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c) {
      const float e = exp_finite_or_zero(s[r * ld + c] - shift[c]);
      s[r * ld + c] = e;
      sum[c] += e;
    }
}

// s = exp(s - lse[c]) * (dp - delta[c]): dS from the scores.
void ds_cols(float* s, const float* dp, int rows, int n, int64_t ld, const float* lse, const float* delta) {
  DF_TRY_SIMD(ds_cols, s, dp, rows, n, ld, lse, delta);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c)
      s[r * ld + c] = exp_finite_or_zero(s[r * ld + c] - lse[c]) * (dp[r * ld + c] - delta[c]);
}

// s = exp(s - lse[r]): P from the scores.
void p_rows(float* s, int rows, int n, int64_t ld, const float* lse) {
  DF_TRY_SIMD(p_rows, s, rows, n, ld, lse);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c) s[r * ld + c] = exp_finite_or_zero(s[r * ld + c] - lse[r]);
}

// s = s * (dp - delta[r]): dS from P.
void ds_rows(float* s, const float* dp, int rows, int n, int64_t ld, const float* delta) {
  DF_TRY_SIMD(ds_rows, s, dp, rows, n, ld, delta);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; ++c) s[r * ld + c] = s[r * ld + c] * (dp[r * ld + c] - delta[r]);
}

// Loads and stores in the tensor dtypes: to_f32 / from_f32 of common.h.

// One [B, H, L, D] operand: element (b, h, r, d) at base + b * sb + h * sh + r * sl + d.
template <typename T>
struct Operand {
  const T* base;
  int64_t sb, sh, sl;
  const T* slice(int64_t b, int64_t h) const { return base + b * sb + h * sh; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return Operand<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The rows of processing positions [p0, p0 + n) of one (batch, head) slice as an fp32 matrix [n, D] with
// leading dimension *ld: the tensor itself when it is fp32 and the rows are evenly spaced and present,
// otherwise packed into buf (absent rows zero).
template <typename T>
const float* load_rows(const T* slice, int64_t sl, const MaskSpec& m, const int* rows, int n, int D, float* buf,
                       int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    bool even = n >= 1 && rows[0] < m.seq_len;
    const int step = n >= 2 ? rows[1] - rows[0] : 1;
    for (int t = 1; even && t < n; ++t) even = rows[t] == rows[0] + t * step && rows[t] < m.seq_len;
    const int64_t stride = n >= 2 ? static_cast<int64_t>(step) * sl : D;
    if (even && stride >= D && stride <= INT_MAX) {
      *ld = stride;
      return slice + rows[0] * sl;
    }
  }
  for (int t = 0; t < n; ++t) {
    float* dst = buf + static_cast<int64_t>(t) * D;
    if (rows[t] < m.seq_len) {
      const T* src = slice + rows[t] * sl;
      for (int d = 0; d < D; ++d) dst[d] = to_f32(src[d]);
    } else {
      std::fill(dst, dst + D, 0.f);
    }
  }
  *ld = D;
  return buf;
}

// Output row r of (b, h) in a [B, L, H, D] tensor: dst[d] = f * acc[d].
template <typename T>
void store_row(T* out, int64_t b, int64_t h, int r, int64_t L, int64_t H, int D, const float* acc, float f) {
  T* dst = out + ((b * L + r) * H + h) * D;
  for (int d = 0; d < D; ++d) dst[d] = from_f32<T>(f * acc[d]);
}

// ------------------------------------------------------------------------------------------------
// Problem description and checks

struct Problem {
  MaskSpec m;
  int64_t B, H, L;
  int D, n_rows, bm, bn, n_qt, n_kt;
  float scale;
};

const char* dtype_error = "expected float16, bfloat16 or float32";

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  const std::pair<const char*, const at::Tensor*> all[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, ": expected a CPU tensor (the C++ CPU backend), got device ",
                t->device());
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name, ": ", dtype_error,
                ", got ", st);
    TORCH_CHECK(t->dim() == 4, op, ": ", name, ": expected 4 dimensions [B, H, L, D], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, ": expected q's dtype ", q.scalar_type(),
                ", got ", st);
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, ": expected the shape of q ", q.sizes(), ", got ",
                t->sizes());
  }
  TORCH_CHECK(q.size(3) >= 1, op, ": q: expected a head size D >= 1, got shape ", q.sizes());
}

Problem make_problem(const at::Tensor& q, int64_t kind, int64_t text_len, int64_t grid_h, int64_t grid_w,
                     int64_t kernel, bool torus, double scale, int64_t block_m, int64_t block_n, const char* op) {
  TORCH_CHECK(kind >= kMaskFull && kind <= kMaskConv, op, ": kind: expected 0 (full), 1 (row), 2 (column) or 3 (conv), got ",
              kind);
  TORCH_CHECK(text_len >= 0, op, ": text_len: expected >= 0, got ", text_len);
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, op, ": grid_h, grid_w: expected >= 1, got ", grid_h, " x ", grid_w);
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, op, ": kernel: expected an odd int >= 1, got ", kernel);
  const int64_t full = text_len + grid_h * grid_w;
  TORCH_CHECK(full <= INT_MAX / 2, op, ": text_len + grid_h * grid_w: expected below 2**30, got ", full);
  const int64_t L = q.size(2);
  TORCH_CHECK(L <= full, op, ": q: expected a sequence length L <= text_len + grid_h * grid_w = ", full,
              " (dim 2 of [B, H, L, D]), got ", L);
  TORCH_CHECK(block_m >= 1 && block_m <= kMaxBlock, op, ": block_m: expected 1 .. ", kMaxBlock, ", got ", block_m);
  TORCH_CHECK(block_n >= 1 && block_n <= kMaxBlock, op, ": block_n: expected 1 .. ", kMaxBlock, ", got ", block_n);
  TORCH_CHECK(std::isfinite(scale), op, ": scale: expected a finite float, got ", scale);
  Problem p;
  p.m = MaskSpec{static_cast<int>(kind), static_cast<int>(text_len), static_cast<int>(grid_h),
                 static_cast<int>(grid_w), static_cast<int>(kernel / 2), torus, static_cast<int>(L)};
  p.B = q.size(0);
  p.H = q.size(1);
  p.L = L;
  p.D = static_cast<int>(q.size(3));
  p.n_rows = L == 0 ? 0 : processing_length(p.m);
  p.bm = static_cast<int>(block_m);
  p.bn = static_cast<int>(block_n);
  p.n_qt = (p.n_rows + p.bm - 1) / p.bm;
  p.n_kt = (p.n_rows + p.bn - 1) / p.bn;
  p.scale = static_cast<float>(scale);
  return p;
}

// A CSR list (indptr [n_tiles + 1], index, partial) of tiles; returns it as int32 pointers.
struct Csr {
  const int32_t* indptr;
  const int32_t* index;
  const int32_t* partial;
};

Csr check_csr(const at::Tensor& indptr, const at::Tensor& index, const at::Tensor& partial, int64_t n_tiles,
              int64_t n_other, const char* op, const char* names, const char* tiles) {
  const std::pair<const char*, const at::Tensor*> all[] = {{"indptr", &indptr}, {"index", &index}, {"partial", &partial}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", names, name, ": expected a CPU tensor, got device ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kInt, op, ": ", names, name, ": expected int32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous(), op, ": ", names, name,
                ": expected a contiguous 1-D tensor, got shape ", t->sizes());
  }
  TORCH_CHECK(indptr.numel() == n_tiles + 1, op, ": ", names, "indptr: expected ", n_tiles + 1,
              " entries (ceil(n_rows / ", tiles, ") + 1 for this layout and tile size), got ", indptr.numel());
  const int32_t* ip = indptr.data_ptr<int32_t>();
  TORCH_CHECK(ip[0] == 0 && ip[n_tiles] == index.numel(), op, ": ", names, "indptr: expected to run from 0 to ",
              names, "index's size ", index.numel(), ", got ", ip[0], " .. ", ip[n_tiles]);
  TORCH_CHECK(partial.numel() == index.numel(), op, ": ", names, "partial: expected ", names, "index's size ",
              index.numel(), ", got ", partial.numel());
  const int32_t* ix = index.data_ptr<int32_t>();
  for (int64_t i = 0; i < n_tiles; ++i) {
    TORCH_CHECK(ip[i] <= ip[i + 1], op, ": ", names, "indptr: expected non-decreasing values, got ", ip[i], " then ",
                ip[i + 1], " at ", i);
    for (int32_t e = ip[i]; e < ip[i + 1]; ++e)
      TORCH_CHECK(ix[e] >= 0 && ix[e] < n_other && (e == ip[i] || ix[e] > ix[e - 1]), op, ": ", names,
                  "index: expected ascending tile numbers in [0, ", n_other, ") per tile, got ", ix[e], " at ", e);
  }
  return Csr{ip, ix, partial.data_ptr<int32_t>()};
}

// A 4-D tensor with unit stride in its last dim (copied otherwise).
at::Tensor unit_last(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

at::Tensor blhd_empty(const Problem& p, const at::Tensor& like) {
  return at::empty({p.B, p.L, p.H, p.D}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// ------------------------------------------------------------------------------------------------
// Tasks: each pass is a list of independent tasks (a tile of one batch and head) run on torch's intra-op
// threads, each thread taking the next task when it is done with one. With static chunks, a thread the
// OS preempts (a shared machine) or a run of costly tiles would hold up the whole pass. Every task writes
// only its own rows, from its own inputs, so the results do not depend on which thread runs which task.

class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  int64_t pop() {  // the next task, or -1
    const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    return t < n_ ? t : -1;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_;
};

template <typename Worker>
void parallel_tasks(int64_t n, const Worker& worker) {
  TaskQueue queue(n);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(queue);  // inline (one caller thread): the first drains it
  });
}

// ------------------------------------------------------------------------------------------------
// Spans: runs of consecutive tiles in one CSR row, at most span_tiles long.

struct Span {
  int e0, e1;  // CSR entries [e0, e1)
  int t0;      // first tile
};

inline Span next_span(const Csr& c, int e, int end, int span_tiles) {
  Span s{e, e + 1, c.index[e]};
  while (s.e1 < end && s.e1 - s.e0 < span_tiles && c.index[s.e1] == c.index[s.e1 - 1] + 1) ++s.e1;
  return s;
}

// Raster rows of processing positions [p0, p1).
void fill_rows(const MaskSpec& m, int p0, int p1, int* rows) {
  for (int p = p0; p < p1; ++p) rows[p - p0] = processing_row(m, p);
}

// Mask points of n raster rows.
void fill_points(const MaskSpec& m, const int* rows, int n, MaskPoint* pts) {
  for (int t = 0; t < n; ++t) pts[t] = mask_point_raster(m, rows[t]);
}

// The element mask of a partial tile: s[a, c] = -inf where processing_allowed is false, for tile rows a of
// points row_pts[0, nr) and columns c of points col_pts[0, nc); RowsAreKeys says which side is the key.
// The kind is a constant here, so that the predicate's switch folds away and the loop has no branch.
template <int Kind, bool RowsAreKeys>
void mask_tile(const MaskSpec& spec, const MaskPoint* row_pts, int nr, const MaskPoint* col_pts, int nc, float* s,
               int64_t lds) {
  MaskSpec m = spec;
  m.kind = Kind;
  for (int a = 0; a < nr; ++a) {
    const MaskPoint pa = row_pts[a];
    float* row = s + a * lds;
    for (int c = 0; c < nc; ++c) {
      const bool ok = RowsAreKeys ? processing_allowed_points(m, col_pts[c], pa)
                                  : processing_allowed_points(m, pa, col_pts[c]);
      row[c] = ok ? row[c] : -INFINITY;
    }
  }
}

template <bool RowsAreKeys>
void apply_mask(const MaskSpec& m, const MaskPoint* row_pts, int nr, const MaskPoint* col_pts, int nc, float* s,
                int64_t lds) {
  switch (m.kind) {
    case kMaskRow:
      return mask_tile<kMaskRow, RowsAreKeys>(m, row_pts, nr, col_pts, nc, s, lds);
    case kMaskColumn:
      return mask_tile<kMaskColumn, RowsAreKeys>(m, row_pts, nr, col_pts, nc, s, lds);
    case kMaskConv:
      return mask_tile<kMaskConv, RowsAreKeys>(m, row_pts, nr, col_pts, nc, s, lds);
    default:
      return mask_tile<kMaskFull, RowsAreKeys>(m, row_pts, nr, col_pts, nc, s, lds);
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: per query tile, the scores of a span are computed transposed, S^T [keys, queries] = K Q^T
// (Q^T packed once per task), so the online softmax runs on vectors of queries and the keys are read in
// place.

template <typename T>
void forward(const Problem& p, const Csr& kv, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             at::Tensor& out, at::Tensor& lse) {
  const Operand<T> Q = operand<T>(q), K = operand<T>(k), V = operand<T>(v);
  T* O = out.data_ptr<T>();
  float* LSE = lse.data_ptr<float>();
  const int D = p.D, bm = p.bm, bn = p.bn;
  const int span_tiles = std::max(1, kSpan / bn), span = span_tiles * bn;
  parallel_tasks(p.B * p.H * p.n_qt, [&](TaskQueue& queue) {
    std::vector<float> qbuf(bm * D), qt(D * bm), kbuf(span * D), vbuf(span * D), s(span * bm), acc(bm * D);
    std::vector<float> mx(bm), l(bm), cmax(bm), shift(bm), csum(bm);
    std::vector<int> qrows(bm), krows(span);
    std::vector<MaskPoint> qpts(bm), kpts(span);
    for (int64_t task; (task = queue.pop()) >= 0;) {
      const int i = p.n_qt - 1 - static_cast<int>(task % p.n_qt);  // the costlier (later) tiles first
      const int64_t bh = task / p.n_qt, b = bh / p.H, h = bh % p.H;
      const int q0 = i * bm, mq = std::min(bm, p.n_rows - q0);
      fill_rows(p.m, q0, q0 + mq, qrows.data());
      fill_points(p.m, qrows.data(), mq, qpts.data());
      int64_t ldq, ldk, ldv;
      const float* qv = load_rows(Q.slice(b, h), Q.sl, p.m, qrows.data(), mq, D, qbuf.data(), &ldq);
      pack_transposed(mq, D, qv, ldq, qt.data(), mq);
      std::fill(acc.begin(), acc.begin() + mq * D, 0.f);
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      const int end_e = kv.indptr[i + 1];
      for (int e = kv.indptr[i]; e < end_e;) {
        const Span sp = next_span(kv, e, end_e, span_tiles);
        e = sp.e1;
        const int k0 = sp.t0 * bn, nk = std::min((sp.e1 - sp.e0) * bn, p.n_rows - k0);
        fill_rows(p.m, k0, k0 + nk, krows.data());
        const float* kt = load_rows(K.slice(b, h), K.sl, p.m, krows.data(), nk, D, kbuf.data(), &ldk);
        const float* vt = load_rows(V.slice(b, h), V.sl, p.m, krows.data(), nk, D, vbuf.data(), &ldv);
        gemm_nt(nk, mq, D, p.scale, kt, ldk, qt.data(), mq, s.data(), mq);  // S^T [nk, mq]
        for (int ee = sp.e0; ee < sp.e1; ++ee) {
          if (!kv.partial[ee]) continue;
          const int c0 = (ee - sp.e0) * bn;
          const int nc = std::min(bn, nk - c0);
          fill_points(p.m, krows.data() + c0, nc, kpts.data());
          apply_mask<true>(p.m, kpts.data(), nc, qpts.data(), mq, s.data() + c0 * mq, mq);
        }
        std::fill(cmax.begin(), cmax.end(), -INFINITY);
        col_max(s.data(), nk, mq, mq, cmax.data());
        for (int t = 0; t < mq; ++t) {
          const float m_new = std::max(mx[t], cmax[t]);
          cmax[t] = online_softmax_rescale(mx[t], m_new);  // now the rescale factor
          shift[t] = online_softmax_shift(m_new);
          mx[t] = m_new;
        }
        std::fill(csum.begin(), csum.end(), 0.f);
        exp_cols(s.data(), nk, mq, mq, shift.data(), csum.data());
        for (int t = 0; t < mq; ++t) {
          l[t] = l[t] * cmax[t] + csum[t];
          if (cmax[t] != 1.f)
            for (int d = 0; d < D; ++d) acc[t * D + d] *= cmax[t];
        }
        gemm_nn(mq, D, nk, s.data(), 1, mq, vt, ldv, acc.data(), D);  // acc += (S^T)^T V
      }
      for (int t = 0; t < mq; ++t) {
        const int r = qrows[t];
        if (r >= p.L) continue;
        store_row(O, b, h, r, p.L, p.H, D, acc.data() + t * D, l[t] > 0.f ? 1.f / l[t] : 0.f);
        LSE[bh * p.L + r] = online_softmax_lse(mx[t], l[t]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward: one list of tasks, the dK/dV tasks (per key tile) then the dQ tasks (per query tile), run in
// one parallel region; they are independent because each computes the delta of its query rows itself,
// delta[r] = sum_d dO[r, d] out[r, d] (dot_chains, the chain of the GEMMs: the same bits in both).

// lse and delta of n query rows (dO and out rows given as fp32 matrices); absent rows get lse = +inf
// (P = exp(s - inf) = 0) and delta = 0.
void query_stats(const Problem& p, int64_t bh, const int* rows, int n, const float* LSE, const float* g, int64_t ldg,
                 const float* o, int64_t ldo, float* lse, float* delta) {
  dot_chains(g, ldg, o, ldo, n, p.D, delta);  // absent rows are packed as zeros: delta 0
  for (int t = 0; t < n; ++t) lse[t] = rows[t] < p.L ? LSE[bh * p.L + rows[t]] : INFINITY;
}

template <typename T>
struct BackwardArgs {
  const Problem& p;
  const Csr &kv, &qc;
  Operand<T> Q, K, V, dO, O;
  const float* LSE;
  T *dq, *dk, *dv;
};

// dQ of one query tile, over key spans, transposed like the forward: S^T = K Q^T, dP^T = V dO^T (Q^T and
// dO^T packed once per task), dS^T = P^T (dP^T - delta), dQ += (dS^T)^T K.
template <typename T>
struct DqWorker {
  const BackwardArgs<T>& a;
  const int D, bm, bn, span_tiles, span;
  std::vector<float> qbuf, gbuf, obuf, qt, gt, kbuf, vbuf, s, dp, acc, lse, delta;
  std::vector<int> qrows, krows;
  std::vector<MaskPoint> qpts, kpts;

  explicit DqWorker(const BackwardArgs<T>& args)
      : a(args), D(args.p.D), bm(args.p.bm), bn(args.p.bn), span_tiles(std::max(1, kSpan / bn)),
        span(span_tiles * bn), qbuf(bm * D), gbuf(bm * D), obuf(bm * D), qt(D * bm), gt(D * bm), kbuf(span * D),
        vbuf(span * D), s(span * bm), dp(span * bm), acc(bm * D), lse(bm), delta(bm), qrows(bm), krows(span),
        qpts(bm), kpts(bn) {}

  void operator()(int64_t task) {
    const Problem& p = a.p;
    const int i = p.n_qt - 1 - static_cast<int>(task % p.n_qt);  // the costlier (later) tiles first
    const int64_t bh = task / p.n_qt, b = bh / p.H, h = bh % p.H;
    const int q0 = i * bm, mq = std::min(bm, p.n_rows - q0);
    fill_rows(p.m, q0, q0 + mq, qrows.data());
    fill_points(p.m, qrows.data(), mq, qpts.data());
    int64_t ldq, ldg, ldo, ldk, ldv;
    const float* qv = load_rows(a.Q.slice(b, h), a.Q.sl, p.m, qrows.data(), mq, D, qbuf.data(), &ldq);
    pack_transposed(mq, D, qv, ldq, qt.data(), mq);
    const float* gv = load_rows(a.dO.slice(b, h), a.dO.sl, p.m, qrows.data(), mq, D, gbuf.data(), &ldg);
    pack_transposed(mq, D, gv, ldg, gt.data(), mq);
    const float* ov = load_rows(a.O.slice(b, h), a.O.sl, p.m, qrows.data(), mq, D, obuf.data(), &ldo);
    query_stats(p, bh, qrows.data(), mq, a.LSE, gv, ldg, ov, ldo, lse.data(), delta.data());
    std::fill(acc.begin(), acc.begin() + mq * D, 0.f);
    const int end_e = a.kv.indptr[i + 1];
    for (int e = a.kv.indptr[i]; e < end_e;) {
      const Span sp = next_span(a.kv, e, end_e, span_tiles);
      e = sp.e1;
      const int k0 = sp.t0 * bn, nk = std::min((sp.e1 - sp.e0) * bn, p.n_rows - k0);
      fill_rows(p.m, k0, k0 + nk, krows.data());
      const float* kt = load_rows(a.K.slice(b, h), a.K.sl, p.m, krows.data(), nk, D, kbuf.data(), &ldk);
      const float* vt = load_rows(a.V.slice(b, h), a.V.sl, p.m, krows.data(), nk, D, vbuf.data(), &ldv);
      gemm_nt(nk, mq, D, p.scale, kt, ldk, qt.data(), mq, s.data(), mq);
      for (int ee = sp.e0; ee < sp.e1; ++ee) {
        if (!a.kv.partial[ee]) continue;
        const int c0 = (ee - sp.e0) * bn;
        const int nc = std::min(bn, nk - c0);
        fill_points(p.m, krows.data() + c0, nc, kpts.data());
        apply_mask<true>(p.m, kpts.data(), nc, qpts.data(), mq, s.data() + c0 * mq, mq);
      }
      gemm_nt(nk, mq, D, 1.f, vt, ldv, gt.data(), mq, dp.data(), mq);
      ds_cols(s.data(), dp.data(), nk, mq, mq, lse.data(), delta.data());
      gemm_nn(mq, D, nk, s.data(), 1, mq, kt, ldk, acc.data(), D);
    }
    for (int t = 0; t < mq; ++t)
      if (qrows[t] < p.L) store_row(a.dq, b, h, qrows[t], p.L, p.H, D, acc.data() + t * D, p.scale);
  }
};

// dK, dV of one key tile, over spans of the query tiles that visit it: S = Q K^T, P = exp(S - lse),
// dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q (K^T and V^T packed once per task; the
// queries read in place).
template <typename T>
struct DkvWorker {
  const BackwardArgs<T>& a;
  const int D, bm, bn, span_tiles, span;
  std::vector<float> kbuf, vbuf, kt, vt, qbuf, gbuf, obuf, s, dp, dk_acc, dv_acc, lse, delta;
  std::vector<int> krows, qrows;
  std::vector<MaskPoint> kpts, qpts;

  explicit DkvWorker(const BackwardArgs<T>& args)
      : a(args), D(args.p.D), bm(args.p.bm), bn(args.p.bn), span_tiles(std::max(1, kSpan / bm)),
        span(span_tiles * bm), kbuf(bn * D), vbuf(bn * D), kt(D * bn), vt(D * bn), qbuf(span * D), gbuf(span * D),
        obuf(span * D), s(span * bn), dp(span * bn), dk_acc(bn * D), dv_acc(bn * D), lse(span), delta(span),
        krows(bn), qrows(span), kpts(bn), qpts(bm) {}

  void operator()(int64_t task) {
    const Problem& p = a.p;
    const int j = static_cast<int>(task % p.n_kt);  // the costlier (earlier, text) tiles first
    const int64_t bh = task / p.n_kt, b = bh / p.H, h = bh % p.H;
    const int k0 = j * bn, nk = std::min(bn, p.n_rows - k0);
    fill_rows(p.m, k0, k0 + nk, krows.data());
    fill_points(p.m, krows.data(), nk, kpts.data());
    int64_t ldk, ldv, ldq, ldg, ldo;
    const float* kv = load_rows(a.K.slice(b, h), a.K.sl, p.m, krows.data(), nk, D, kbuf.data(), &ldk);
    pack_transposed(nk, D, kv, ldk, kt.data(), nk);
    const float* vv = load_rows(a.V.slice(b, h), a.V.sl, p.m, krows.data(), nk, D, vbuf.data(), &ldv);
    pack_transposed(nk, D, vv, ldv, vt.data(), nk);
    std::fill(dk_acc.begin(), dk_acc.begin() + nk * D, 0.f);
    std::fill(dv_acc.begin(), dv_acc.begin() + nk * D, 0.f);
    const int end_e = a.qc.indptr[j + 1];
    for (int e = a.qc.indptr[j]; e < end_e;) {
      const Span sp = next_span(a.qc, e, end_e, span_tiles);
      e = sp.e1;
      const int q0 = sp.t0 * bm, mq = std::min((sp.e1 - sp.e0) * bm, p.n_rows - q0);
      fill_rows(p.m, q0, q0 + mq, qrows.data());
      const float* qv = load_rows(a.Q.slice(b, h), a.Q.sl, p.m, qrows.data(), mq, D, qbuf.data(), &ldq);
      const float* gv = load_rows(a.dO.slice(b, h), a.dO.sl, p.m, qrows.data(), mq, D, gbuf.data(), &ldg);
      const float* ov = load_rows(a.O.slice(b, h), a.O.sl, p.m, qrows.data(), mq, D, obuf.data(), &ldo);
      query_stats(p, bh, qrows.data(), mq, a.LSE, gv, ldg, ov, ldo, lse.data(), delta.data());
      gemm_nt(mq, nk, D, p.scale, qv, ldq, kt.data(), nk, s.data(), nk);  // S [mq, nk]
      for (int ee = sp.e0; ee < sp.e1; ++ee) {
        if (!a.qc.partial[ee]) continue;
        const int r0 = (ee - sp.e0) * bm;
        const int nr = std::min(bm, mq - r0);
        fill_points(p.m, qrows.data() + r0, nr, qpts.data());
        apply_mask<false>(p.m, qpts.data(), nr, kpts.data(), nk, s.data() + r0 * nk, nk);
      }
      p_rows(s.data(), mq, nk, nk, lse.data());
      gemm_nn(nk, D, mq, s.data(), 1, nk, gv, ldg, dv_acc.data(), D);  // dV += P^T dO
      gemm_nt(mq, nk, D, 1.f, gv, ldg, vt.data(), nk, dp.data(), nk);  // dP [mq, nk]
      ds_rows(s.data(), dp.data(), mq, nk, nk, delta.data());
      gemm_nn(nk, D, mq, s.data(), 1, nk, qv, ldq, dk_acc.data(), D);  // dK += dS^T Q
    }
    for (int r = 0; r < nk; ++r) {
      if (krows[r] >= p.L) continue;
      store_row(a.dk, b, h, krows[r], p.L, p.H, D, dk_acc.data() + r * D, p.scale);
      store_row(a.dv, b, h, krows[r], p.L, p.H, D, dv_acc.data() + r * D, 1.f);
    }
  }
};

template <typename T>
void backward(const BackwardArgs<T>& args) {
  const int64_t n_dkv = args.p.B * args.p.H * args.p.n_kt, n_dq = args.p.B * args.p.H * args.p.n_qt;
  parallel_tasks(n_dkv + n_dq, [&](TaskQueue& queue) {
    DkvWorker<T> dkv(args);  // dK/dV tasks first: four GEMMs a span against the dQ tasks' three
    DqWorker<T> dq(args);
    for (int64_t task; (task = queue.pop()) >= 0;) task < n_dkv ? dkv(task) : dq(task - n_dkv);
  });
}

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "dalle_fast: unexpected dtype ", st);
  }
}

// ------------------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in, const at::Tensor& kv_indptr,
                                                            const at::Tensor& kv_index, const at::Tensor& kv_partial,
                                                            int64_t kind, int64_t text_len, int64_t grid_h,
                                                            int64_t grid_w, int64_t kernel, bool torus, double scale,
                                                            int64_t block_m, int64_t block_n) {
  constexpr const char* op = "sparse_attention_fwd";
  check_qkv(q_in, k_in, v_in, op);
  const Problem p = make_problem(q_in, kind, text_len, grid_h, grid_w, kernel, torus, scale, block_m, block_n, op);
  at::Tensor out = blhd_empty(p, q_in);
  at::Tensor lse = at::empty({p.B, p.H, p.L}, q_in.options().dtype(at::kFloat));
  if (p.L == 0) return {out.transpose(1, 2), lse};
  const Csr kv = check_csr(kv_indptr, kv_index, kv_partial, p.n_qt, p.n_kt, op, "kv_", "block_m");
  if (p.B * p.H == 0) return {out.transpose(1, 2), lse};
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    forward<T>(p, kv, q, k, v, out, lse);
  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& kv_indptr, const at::Tensor& kv_index,
    const at::Tensor& kv_partial, const at::Tensor& q_indptr, const at::Tensor& q_index, const at::Tensor& q_partial,
    int64_t kind, int64_t text_len, int64_t grid_h, int64_t grid_w, int64_t kernel, bool torus, double scale,
    int64_t block_m, int64_t block_n) {
  constexpr const char* op = "sparse_attention_bwd";
  check_qkv(q_in, k_in, v_in, op);
  const std::pair<const char*, const at::Tensor*> like_q[] = {{"grad_out", &grad_in}, {"out", &out_in}};
  for (const auto& [name, t] : like_q) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", t->device());
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type(), op, ": ", name, ": expected q's dtype ", q_in.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->sizes() == q_in.sizes(), op, ": ", name, ": expected the shape of q ", q_in.sizes(), ", got ",
                t->sizes());
  }
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat, op,
              ": lse: expected a float32 CPU tensor, got ", lse_in.scalar_type(), " on ", lse_in.device());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == q_in.sizes().slice(0, 3), op, ": lse: expected shape [B, H, L] = ",
              q_in.sizes().slice(0, 3), ", got ", lse_in.sizes());
  const Problem p = make_problem(q_in, kind, text_len, grid_h, grid_w, kernel, torus, scale, block_m, block_n, op);
  at::Tensor dq = blhd_empty(p, q_in), dk = blhd_empty(p, q_in), dv = blhd_empty(p, q_in);
  const auto result = [&] { return std::make_tuple(dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)); };
  if (p.L == 0) return result();
  const Csr kv = check_csr(kv_indptr, kv_index, kv_partial, p.n_qt, p.n_kt, op, "kv_", "block_m");
  const Csr qc = check_csr(q_indptr, q_index, q_partial, p.n_kt, p.n_qt, op, "q_", "block_n");
  if (p.B * p.H == 0) return result();
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor g = unit_last(grad_in), o = unit_last(out_in), lse = lse_in.contiguous();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    backward<T>(BackwardArgs<T>{p, kv, qc, operand<T>(q), operand<T>(k), operand<T>(v), operand<T>(g), operand<T>(o),
                                lse.data_ptr<float>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>()});
  });
  return result();
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention_fwd", &dalle_fast::sparse_attention_fwd_cpu);
  m.impl("sparse_attention_bwd", &dalle_fast::sparse_attention_bwd_cpu);
}
