// CUDA C++ backend of the block-sparse DALL-E attention: sparse_attention_fwd and sparse_attention_bwd
// (schemas in csrc/ops.cpp, semantics in DESIGN.md section 4 and the op's docstring in
// dalle_fast/ops/attention.py). fp16 and bf16 inputs on tensor cores (nvcuda::wmma m16n16k16, fp32
// accumulation); fp32 is refused (the triton backend serves it). Head sizes D in {32, 64, 128}; tiles of
// 64 queries x 64 keys (block_m = block_n = 64, CXX_BLOCKS["cuda"]).
//
// All per-element mask and softmax math comes from dalle_fast/attention.h, shared with the C++ CPU backend:
// processing_row (memory row of a processing position), processing_allowed (element mask of partial tiles),
// online_softmax_shift / _rescale / _lse (the -inf-safe online softmax). This file only maps work onto
// threads. It favours a design that can be checked by reading over peak speed: every GEMM operand goes
// through shared memory, every score tile is staged in shared memory as fp32, and row statistics are kept
// by a fixed group of four threads per row.
//
// Processing order. Processing position p in [0, n_rows) lives at memory row r = processing_row(m, p) of
// q/k/v/out; it is absent when p >= n_rows (the ragged end of the last tile) or r >= L (column layers fed a
// prefix). Absent rows are never loaded (their shared-memory rows are zero-filled, so no garbage, NaN
// included, enters a GEMM), never stored, and never contribute: on partial tiles tile_allowed() masks
// them, and full tiles have every row and column present by construction of the layout.
//
// Block shape (every kernel but the delta preprocess): 256 threads = 8 warps, one tile of 64 rows.
//   GEMM mapping: warp w owns the 16-row strip rs = w & 3 (rows 16*rs .. 16*rs + 15) and the column half
//     ch = w >> 2 of the GEMM's output: for a 64 x 64 score tile, columns 32*ch .. 32*ch + 31 (two 16x16
//     fragments); for a 64 x D output (O, dQ, dK, dV), columns ch*D/2 .. ch*D/2 + D/2 - 1 (D/32 fragments).
//   Row mapping (softmax statistics, elementwise score work, final stores): thread t owns row t >> 2 with
//     sub = t & 3, and touches columns sub, sub + 4, sub + 8, ... (interleaved: the 8 rows of a warp x 4
//     subs hit 32 distinct banks in the fp32 tiles, whose leading dims are 4 mod 32 words). The four
//     threads of a row are consecutive lanes of one warp and combine with __shfl_xor_sync(1, 2).
// Shared-memory tiles (leading dims padded so that wmma pointers stay 32-byte aligned and rows shift by
// 16 bytes, avoiding bank conflicts): 16-bit [64][D + 8] operand tiles (Q, K, V, dO), fp32 [64][68] score
// tiles (S, dP), 16-bit [64][72] probability tiles (P, dS), fp32 [64][D + 4] accumulator / staging tiles.
// Every region starts at a multiple of 128 bytes. Dynamic smem per block (bytes), D = 32 / 64 / 128:
//   forward   3 operand + S + P + O                         51200 /  71680 / 112640
//   dK/dV     4 operand + S + dP + P + dS + lse, delta      74240 /  90624 / 123392
//   dQ        4 operand + S + dP + dS + lse, delta          65024 /  81408 / 114176
// With the registers ptxas reports (sm_90, no spills in the tile loops), an H200 SM (228 KiB smem, 64K
// registers) holds 4 / 3 / 2 forward blocks, 3 / 2 / 1 dK/dV blocks and 3 / 2 / 1-2 dQ blocks.
// All above the 48 KiB default: the kernels opt in with cudaFuncAttributeMaxDynamicSharedMemorySize set to
// their exact (constant, per instantiation) size before every launch, checked against the device's limit.
//
// Forward (_sparse_attention_fwd_kernel). Grid (query tiles, B*H). The block loads its Q tile once, zeroes
// an fp32 O tile in smem, and for each key tile j of kv_index[kv_indptr[i] : kv_indptr[i + 1]]:
//   load K_j, V_j                                   | sync A (K, V visible; Q, O zero on the first pass)
//   S = Q K^T into smem (fp32)                      | sync B
//   per row: scale, element mask on partial tiles, running max m, p = exp(s - m), P (16-bit) to smem,
//   l = l * alpha + sum p, O row *= alpha           | sync C (P and the rescaled O visible)
//   O += P V (wmma accumulators loaded from and stored back to the smem O tile)
//                                                   | sync D (K, V, S, P, O free for the next tile)
// then out row = O row / l in q's dtype at memory row r of out [B, L, H, D], lse = m + log l ([B, H, L]).
// The O tile lives in smem rather than in registers because a wmma accumulator's element-to-row mapping is
// unspecified, so the per-row rescale by alpha cannot be applied to a fragment.
//
// Backward (FlashAttention-2 style, two deterministic passes, no atomics, no [L, L] buffer):
//   delta preprocess: delta[b, h, r] = sum_d dO[r, d] * out[r, d] (fp32), one warp per row.
//   dK/dV (_sparse_attention_bwd_kv_kernel): grid (key tiles, B*H). Loads K_j, V_j once; for each query
//     tile i of q_index[q_indptr[j] : ...]: load Q_i, dO_i, lse_i, delta_i | sync; S = Q K^T, dP = dO V^T
//     into smem | sync; P = exp(scale * S - lse) on allowed pairs (0 elsewhere), dS = P * (dP - delta),
//     both rounded to 16 bits into smem | sync; dV += P^T dO, dK += dS^T Q (register accumulators: no
//     rescaling is needed, so fragments can stay in registers; the transposes are col_major wmma loads of
//     the row-major P / dS tiles) | sync. Then dK *= scale; each of dK, dV staged through smem (fp32,
//     reusing the S/dP region) and written at the key tile's memory rows.
//   dQ (_sparse_attention_bwd_q_kernel): grid (query tiles, B*H). Loads Q_i, dO_i, lse_i, delta_i once;
//     for each key tile j of kv_index: the same S, dP and dS, then dQ += dS K (registers); dQ *= scale.
//   Each output element is accumulated by one block in a fixed order: bitwise deterministic.
//
// Inputs: q, k, v, grad_out are read with 16-byte vector loads, which needs stride(-1) == 1, every other
// stride a multiple of 8 elements (or a size-1 dim) and a 16-byte aligned data pointer; a tensor that
// misses any of these is copied to a fresh contiguous tensor first (one copy). out is only read by the
// delta kernel, with plain strided loads.
// Debug builds (DALLE_FAST_DEBUG) check the layout arrays' values and the launch shape inside the kernels
// and trap on failure.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "dalle_fast/attention.h"

#include "dalle_fast/device_check.h"

// bf16 tensor-core fragments need sm_80; the host refuses older devices, the kernels trap there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define DF_ATTN_NO_TENSOR_CORES 1
#endif

namespace dalle_fast {
namespace {

namespace wmma = nvcuda::wmma;

// ------------------------------------------------------------------------------------------------
// Tile geometry and shared-memory layout.

constexpr int kBM = 64;  // queries per tile
constexpr int kBN = 64;  // keys per tile
static_assert(kBM == kBN, "one tile height serves every loader and the row mapping");
constexpr int kTile = kBM;
constexpr int kThreads = 256;  // 8 warps
static_assert(kThreads == 4 * kTile, "row mapping: four threads per tile row");
constexpr int kLdS = kBN + 4;  // fp32 score tiles [64][68]
constexpr int kLdP = kBN + 8;  // 16-bit P / dS tiles [64][72]
constexpr int kScoreBytes = kTile * kLdS * 4;
constexpr int kPBytes = kTile * kLdP * 2;
constexpr int kRowStatBytes = 2 * kTile * 4;  // lse and delta of a query tile

template <int D>
struct Geo {
  static_assert(D == 32 || D == 64 || D == 128, "head sizes 32, 64, 128");
  static constexpr int kLdH = D + 8;  // 16-bit operand tiles [64][D + 8]
  static constexpr int kLdF = D + 4;  // fp32 [64][D + 4] (forward O, backward output staging)
  static constexpr int kOpBytes = kTile * kLdH * 2;
  static constexpr int kFBytes = kTile * kLdF * 4;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kFrags = D / 32;  // 16x16 output fragments per warp of a 64 x D GEMM
  // forward: Q K V | S | P | O
  static constexpr int kFwdSmem = 3 * kOpBytes + kScoreBytes + kPBytes + kFBytes;
  // dK/dV: K V Q dO | S dP | P dS | lse delta
  static constexpr int kBwdKvSmem = 4 * kOpBytes + 2 * kScoreBytes + 2 * kPBytes + kRowStatBytes;
  // dQ: Q dO K V | S dP | dS | lse delta
  static constexpr int kBwdQSmem = 4 * kOpBytes + 2 * kScoreBytes + kPBytes + kRowStatBytes;
  static_assert(kFBytes <= 2 * kScoreBytes, "the backward stages its fp32 outputs in the S/dP region");
  static_assert(kOpBytes % 128 == 0 && kFBytes % 128 == 0, "regions stay 128-byte aligned");
};
static_assert(kScoreBytes % 128 == 0 && kPBytes % 128 == 0 && kRowStatBytes % 128 == 0, "128-byte regions");

// ------------------------------------------------------------------------------------------------
// 16-bit element types (the kernels see __half / __nv_bfloat16; DF_ATTN_DISPATCH maps the dtypes).

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint32_t bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <typename T>
__device__ __forceinline__ T from_f(float f);
template <>
__device__ __forceinline__ __half from_f<__half>(float f) {
  return __float2half_rn(f);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}

// Eight floats rounded to T, as one 16-byte vector (element 0 in the low half of .x: little endian).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = bits_of(from_f<T>(f[2 * i])) | (bits_of(from_f<T>(f[2 * i + 1])) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Element mask of a partial tile in processing positions: processing_allowed, plus the ragged end of the
// last tile (p >= n_rows), whose processing_row would be meaningless for column layers.
__device__ __forceinline__ bool tile_allowed(const MaskSpec& m, int n_rows, int pq, int pk) {
  return pq < n_rows && pk < n_rows && processing_allowed(m, pq, pk);
}

// Bit j set when pair (pq, kt*64 + sub + 4j) is allowed, j < 16: the element mask of the thread's 16 columns
// of a partial tile (all ones on full tiles). A rolled loop: the mask math (integer divisions by the grid
// sizes) is emitted once instead of 16 times, which keeps the unrolled score loops small.
__device__ __forceinline__ uint32_t row_mask(const MaskSpec& m, int n_rows, bool partial, int pq, int kt, int sub) {
  if (!partial) return 0xffffu;
  uint32_t bits = 0u;
#pragma unroll 1
  for (int j = 0; j < kBN / 4; ++j) bits |= uint32_t(tile_allowed(m, n_rows, pq, kt * kBN + sub + 4 * j)) << j;
  return bits;
}

// Memory row of processing position p, or -1 when the position is absent.
__device__ __forceinline__ int present_row(const MaskSpec& m, int n_rows, int p) {
  if (p >= n_rows) return -1;
  const int r = processing_row(m, p);
  return r < m.seq_len ? r : -1;
}

// ------------------------------------------------------------------------------------------------
// Global <-> shared memory.

// Rows of tile `tile` (processing positions tile*64 + row) of a [L, D] head slice `src` (row stride
// `row_stride` elements, rows 16-byte aligned) into the smem tile dst [64][D + 8]; absent rows zero.
// Thread t moves chunks t, t + 256, ... of the 64 * D/8 16-byte chunks (row = chunk / (D/8)).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t row_stride, int tile,
                                          const MaskSpec& m, int n_rows) {
  using G = Geo<D>;
  static_assert((kTile * G::kChunks) % kThreads == 0, "whole chunk rounds");
#pragma unroll
  for (int t = 0; t < kTile * G::kChunks / kThreads; ++t) {
    const int idx = threadIdx.x + t * kThreads;
    const int row = idx / G::kChunks, c = idx % G::kChunks;
    const int r = present_row(m, n_rows, tile * kTile + row);
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r >= 0) val = *reinterpret_cast<const uint4*>(src + r * row_stride + c * 8);
    *reinterpret_cast<uint4*>(dst + row * G::kLdH + c * 8) = val;
  }
}

// lse or delta of the tile's rows (a [L] fp32 slice) into dst[64]; absent rows 0 (never used: every pair
// of an absent row is masked, and only partial tiles hold absent rows).
__device__ __forceinline__ void load_row_stats(float* __restrict__ dst, const float* __restrict__ src, int tile,
                                               const MaskSpec& m, int n_rows) {
  if (threadIdx.x < kTile) {
    const int r = present_row(m, n_rows, tile * kTile + threadIdx.x);
    dst[threadIdx.x] = r >= 0 ? src[r] : 0.f;
  }
}

// The fp32 smem tile src [64][D + 4], rounded to T, to the present rows of the tile in an output
// [B, L, H, D] (dst points at (b, 0, h, 0); rows are H*D elements apart). Same chunk mapping as load_tile.
template <typename T, int D>
__device__ __forceinline__ void store_tile(T* __restrict__ dst, int64_t row_stride, const float* __restrict__ src,
                                           int tile, const MaskSpec& m, int n_rows) {
  using G = Geo<D>;
#pragma unroll
  for (int t = 0; t < kTile * G::kChunks / kThreads; ++t) {
    const int idx = threadIdx.x + t * kThreads;
    const int row = idx / G::kChunks, c = idx % G::kChunks;
    const int r = present_row(m, n_rows, tile * kTile + row);
    if (r < 0) continue;
    const float4 a = *reinterpret_cast<const float4*>(src + row * G::kLdF + c * 8);
    const float4 b = *reinterpret_cast<const float4*>(src + row * G::kLdF + c * 8 + 4);
    const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    *reinterpret_cast<uint4*>(dst + r * row_stride + c * 8) = pack8<T>(f);
  }
}

// ------------------------------------------------------------------------------------------------
// Warp GEMMs on smem tiles (see the mapping at the top: rs = warp & 3, ch = warp >> 2).

template <typename T>
using FragARow = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// C[64][64] (fp32, ld kLdS) = A[64][D] * B[64][D]^T, A and B operand tiles (ld D + 8). The warp computes
// rows 16*rs.., columns 32*ch.. . B^T is B read as a col_major matrix_b: element (k = d, n = row) sits at
// B[n * ld + k].
template <typename T, int D>
__device__ __forceinline__ void gemm_abt(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ C) {
  using G = Geo<D>;
  const int warp = threadIdx.x >> 5, rs = warp & 3, ch = warp >> 2;
  FragC acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragARow<T> a;
    wmma::load_matrix_sync(a, A + (16 * rs) * G::kLdH + 16 * kk, G::kLdH);
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      FragBCol<T> b;
      wmma::load_matrix_sync(b, B + (32 * ch + 16 * n) * G::kLdH + 16 * kk, G::kLdH);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < 2; ++n)
    wmma::store_matrix_sync(C + (16 * rs) * kLdS + 32 * ch + 16 * n, acc[n], kLdS, wmma::mem_row_major);
}

// acc[n] (the warp's 16 x D/2 block of a 64 x D result, rows 16*rs.., columns ch*D/2 + 16n..) +=
// A[64][64] * B[64][D], A a 16-bit [64][72] tile (P or dS), B an operand tile. TRANS_A: use A^T (A read as a
// col_major matrix_a: element (m, k) of A^T = A[k][m] sits at A[k * ld + m]).
template <typename T, int D, bool TRANS_A>
__device__ __forceinline__ void gemm_acc(FragC (&acc)[Geo<D>::kFrags], const T* __restrict__ A,
                                         const T* __restrict__ B) {
  using G = Geo<D>;
  const int warp = threadIdx.x >> 5, rs = warp & 3, ch = warp >> 2;
  using FragA = typename std::conditional<TRANS_A, FragACol<T>, FragARow<T>>::type;
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    FragA a;
    if constexpr (TRANS_A) {
      wmma::load_matrix_sync(a, A + (16 * kk) * kLdP + 16 * rs, kLdP);
    } else {
      wmma::load_matrix_sync(a, A + (16 * rs) * kLdP + 16 * kk, kLdP);
    }
#pragma unroll
    for (int n = 0; n < G::kFrags; ++n) {
      FragBRow<T> b;
      wmma::load_matrix_sync(b, B + (16 * kk) * G::kLdH + ch * (D / 2) + 16 * n, G::kLdH);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
}

// The warp's accumulators times `mul` into the fp32 staging tile [64][D + 4].
template <int D>
__device__ __forceinline__ void stage_acc(float* __restrict__ F, FragC (&acc)[Geo<D>::kFrags], float mul) {
  using G = Geo<D>;
  const int warp = threadIdx.x >> 5, rs = warp & 3, ch = warp >> 2;
#pragma unroll
  for (int n = 0; n < G::kFrags; ++n) {
#pragma unroll
    for (int e = 0; e < acc[n].num_elements; ++e) acc[n].x[e] *= mul;
    wmma::store_matrix_sync(F + (16 * rs) * G::kLdF + ch * (D / 2) + 16 * n, acc[n], G::kLdF, wmma::mem_row_major);
  }
}

// Layout arrays of one tile: entries [beg, end) of an index array with n_index entries, values in [0, n_tiles).
__device__ __forceinline__ void check_csr(int beg, int end, int n_index) {
  DF_DEVICE_CHECK(0 <= beg && beg <= end && end <= n_index);
}

// ------------------------------------------------------------------------------------------------
// Kernels.

struct HeadStrides {  // element strides of a [B, H, L, D] tensor (stride(-1) == 1 for the vector loaders)
  int64_t b, h, l;
};

// Forward. Grid (n_q_tiles, min(B*H, 65535)), block 256, dynamic smem Geo<D>::kFwdSmem. See the top.
// q, k, v: [B, H, L, D] (strides given, rows 16-byte aligned); out: [B, L, H, D] contiguous; lse: [B, H, L].
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _sparse_attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 T* __restrict__ out, float* __restrict__ lse, HeadStrides sq, HeadStrides sk,
                                 HeadStrides sv, const int* __restrict__ kv_indptr, const int* __restrict__ kv_index,
                                 const int* __restrict__ kv_partial, int n_index, int n_tiles, int BH, int H,
                                 MaskSpec m, int n_rows, float scale) {
#ifdef DF_ATTN_NO_TENSOR_CORES
  __trap();
#else
  using G = Geo<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + G::kOpBytes);
  T* Vs = reinterpret_cast<T*>(smem + 2 * G::kOpBytes);
  float* Sf = reinterpret_cast<float*>(smem + 3 * G::kOpBytes);
  T* Ph = reinterpret_cast<T*>(smem + 3 * G::kOpBytes + kScoreBytes);
  float* Of = reinterpret_cast<float*>(smem + 3 * G::kOpBytes + kScoreBytes + kPBytes);
  DF_DEVICE_CHECK(blockDim.x == kThreads && blockDim.y == 1 && blockDim.z == 1);

  const int qt = blockIdx.x;
  const int row = threadIdx.x >> 2, sub = threadIdx.x & 3;  // row mapping
  const int pq = qt * kTile + row;
  const int L = m.seq_len;
  const int beg = kv_indptr[qt], end = kv_indptr[qt + 1];
  check_csr(beg, end, n_index);

  for (int bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    const int b = bh / H, h = bh % H;
    const T* qb = q + b * sq.b + h * sq.h;
    const T* kb = k + b * sk.b + h * sk.h;
    const T* vb = v + b * sv.b + h * sv.h;

    load_tile<T, D>(Qs, qb, sq.l, qt, m, n_rows);
    for (int idx = threadIdx.x; idx < kTile * G::kLdF; idx += kThreads) Of[idx] = 0.f;
    float m_run = -INFINITY, l_run = 0.f;  // this row's statistics (same in its four threads)

    for (int t = beg; t < end; ++t) {
      const int kt = kv_index[t];
      const bool partial = kv_partial[t] != 0;
      DF_DEVICE_CHECK(kt >= 0 && kt < n_tiles && (t == beg || kv_index[t - 1] < kt));
      load_tile<T, D>(Ks, kb, sk.l, kt, m, n_rows);
      load_tile<T, D>(Vs, vb, sv.l, kt, m, n_rows);
      __syncthreads();  // A: K, V (and Q, zeroed O on the first tile) visible

      gemm_abt<T, D>(Qs, Ks, Sf);
      __syncthreads();  // B: the score tile is complete

      const uint32_t allowed = row_mask(m, n_rows, partial, pq, kt, sub);
      float s[kBN / 4];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBN / 4; ++j) {
        const int c = sub + 4 * j;
        float x = Sf[row * kLdS + c] * scale;
        if (!((allowed >> j) & 1u)) x = -INFINITY;
        s[j] = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run, mx);
      const float alpha = online_softmax_rescale(m_run, m_new);
      const float shift = online_softmax_shift(m_new);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kBN / 4; ++j) {
        const float p = expf(s[j] - shift);  // -inf (masked) -> 0
        sum += p;
        Ph[row * kLdP + sub + 4 * j] = from_f<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l_run = l_run * alpha + sum;
      m_run = m_new;
#pragma unroll
      for (int j = 0; j < D / 4; ++j) Of[row * G::kLdF + sub + 4 * j] *= alpha;
      __syncthreads();  // C: P and the rescaled O visible to the GEMM warps

      {
        const int warp = threadIdx.x >> 5, rs = warp & 3, ch = warp >> 2;
        FragC acc[G::kFrags];
        float* Ow = Of + (16 * rs) * G::kLdF + ch * (D / 2);
#pragma unroll
        for (int n = 0; n < G::kFrags; ++n) wmma::load_matrix_sync(acc[n], Ow + 16 * n, G::kLdF, wmma::mem_row_major);
        gemm_acc<T, D, false>(acc, Ph, Vs);
#pragma unroll
        for (int n = 0; n < G::kFrags; ++n) wmma::store_matrix_sync(Ow + 16 * n, acc[n], G::kLdF, wmma::mem_row_major);
      }
      __syncthreads();  // D: K, V, S, P free and O complete before the next tile
    }
    __syncthreads();  // O (zeroed by other threads) visible even when the row visited no tile

    const int r = present_row(m, n_rows, pq);
    if (r >= 0) {
      const float inv_l = l_run > 0.f ? 1.f / l_run : 0.f;
      T* orow = out + ((static_cast<int64_t>(b) * L + r) * H + h) * D;
#pragma unroll
      for (int j = 0; j < G::kChunks / 4; ++j) {  // the row's 16-byte chunks sub, sub + 4, ...
        const int c = sub + 4 * j;
        const float4 a = *reinterpret_cast<const float4*>(Of + row * G::kLdF + c * 8);
        const float4 e = *reinterpret_cast<const float4*>(Of + row * G::kLdF + c * 8 + 4);
        const float f[8] = {a.x * inv_l, a.y * inv_l, a.z * inv_l, a.w * inv_l,
                            e.x * inv_l, e.y * inv_l, e.z * inv_l, e.w * inv_l};
        *reinterpret_cast<uint4*>(orow + c * 8) = pack8<T>(f);
      }
      if (sub == 0) lse[static_cast<int64_t>(bh) * L + r] = online_softmax_lse(m_run, l_run);
    }
    __syncthreads();  // Q and O are rewritten for the next (b, h)
  }
#endif
}

// delta[row] = sum_d dO[row, d] * out[row, d] over the B*H*L rows (row = (b*H + h)*L + r), fp32. One warp
// per row, lane l reading d = l, l + 32, ...; block 256 (8 rows). dO and out with any strides.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _sparse_attention_bwd_delta_kernel(const T* __restrict__ dO, const T* __restrict__ out, float* __restrict__ delta,
                                       HeadStrides sg, int64_t sg_d, HeadStrides so, int64_t so_d, int64_t rows, int H,
                                       int L) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave; no block barrier below
  const int64_t bh = row / L;
  const int r = static_cast<int>(row % L);
  const int64_t b = bh / H, h = bh % H;
  const T* g = dO + b * sg.b + h * sg.h + r * sg.l;
  const T* o = out + b * so.b + h * so.h + r * so.l;
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < D / 32; ++j) {
    const int d = lane + 32 * j;
    acc += to_f(g[d * sg_d]) * to_f(o[d * so_d]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// Elementwise middle of both backward passes, row mapping: P = exp(scale * S - lse) on allowed pairs (0 on
// masked pairs of a partial tile), dS = P * (dP - delta); P (when WRITE_P) and dS rounded to T into [64][72].
template <typename T, bool WRITE_P>
__device__ __forceinline__ void bwd_scores(const float* __restrict__ Sf, const float* __restrict__ dPf,
                                           const float* __restrict__ lse_s, const float* __restrict__ delta_s,
                                           T* __restrict__ Ph, T* __restrict__ dSh, bool partial, const MaskSpec& m,
                                           int n_rows, int qt, int kt, float scale) {
  const int row = threadIdx.x >> 2, sub = threadIdx.x & 3;
  const int pq = qt * kTile + row;
  const float lse_r = lse_s[row], delta_r = delta_s[row];
  const uint32_t allowed = row_mask(m, n_rows, partial, pq, kt, sub);
#pragma unroll
  for (int j = 0; j < kBN / 4; ++j) {
    const int c = sub + 4 * j;
    const bool ok = (allowed >> j) & 1u;
    const float p = ok ? expf(Sf[row * kLdS + c] * scale - lse_r) : 0.f;
    const float ds = p * (dPf[row * kLdS + c] - delta_r);
    if constexpr (WRITE_P) Ph[row * kLdP + c] = from_f<T>(p);
    dSh[row * kLdP + c] = from_f<T>(ds);
  }
}

// dK, dV. Grid (n_k_tiles, min(B*H, 65535)), block 256, dynamic smem Geo<D>::kBwdKvSmem. See the top.
// dk, dv: [B, L, H, D] contiguous; lse, delta: [B, H, L] fp32.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _sparse_attention_bwd_kv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    const T* __restrict__ dO, const float* __restrict__ lse,
                                    const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                                    HeadStrides sq, HeadStrides sk, HeadStrides sv, HeadStrides sg,
                                    const int* __restrict__ q_indptr, const int* __restrict__ q_index,
                                    const int* __restrict__ q_partial, int n_index, int n_tiles, int BH, int H,
                                    MaskSpec m, int n_rows, float scale) {
#ifdef DF_ATTN_NO_TENSOR_CORES
  __trap();
#else
  using G = Geo<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = reinterpret_cast<T*>(smem + G::kOpBytes);
  T* Qs = reinterpret_cast<T*>(smem + 2 * G::kOpBytes);
  T* dOs = reinterpret_cast<T*>(smem + 3 * G::kOpBytes);
  float* Sf = reinterpret_cast<float*>(smem + 4 * G::kOpBytes);
  float* dPf = reinterpret_cast<float*>(smem + 4 * G::kOpBytes + kScoreBytes);
  T* Ph = reinterpret_cast<T*>(smem + 4 * G::kOpBytes + 2 * kScoreBytes);
  T* dSh = reinterpret_cast<T*>(smem + 4 * G::kOpBytes + 2 * kScoreBytes + kPBytes);
  float* lse_s = reinterpret_cast<float*>(smem + 4 * G::kOpBytes + 2 * kScoreBytes + 2 * kPBytes);
  float* delta_s = lse_s + kTile;
  float* stage = Sf;  // [64][D + 4] fp32 over S and dP once the loop is done
  DF_DEVICE_CHECK(blockDim.x == kThreads && blockDim.y == 1 && blockDim.z == 1);

  const int kt = blockIdx.x;
  const int L = m.seq_len;
  const int beg = q_indptr[kt], end = q_indptr[kt + 1];
  check_csr(beg, end, n_index);

  for (int bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    const int b = bh / H, h = bh % H;
    const T* qb = q + b * sq.b + h * sq.h;
    const T* gb = dO + b * sg.b + h * sg.h;
    const float* lse_b = lse + static_cast<int64_t>(bh) * L;
    const float* delta_b = delta + static_cast<int64_t>(bh) * L;

    load_tile<T, D>(Ks, k + b * sk.b + h * sk.h, sk.l, kt, m, n_rows);
    load_tile<T, D>(Vs, v + b * sv.b + h * sv.h, sv.l, kt, m, n_rows);
    FragC dk_acc[G::kFrags], dv_acc[G::kFrags];
#pragma unroll
    for (int n = 0; n < G::kFrags; ++n) {
      wmma::fill_fragment(dk_acc[n], 0.f);
      wmma::fill_fragment(dv_acc[n], 0.f);
    }

    for (int t = beg; t < end; ++t) {
      const int qt = q_index[t];
      const bool partial = q_partial[t] != 0;
      DF_DEVICE_CHECK(qt >= 0 && qt < n_tiles && (t == beg || q_index[t - 1] < qt));
      load_tile<T, D>(Qs, qb, sq.l, qt, m, n_rows);
      load_tile<T, D>(dOs, gb, sg.l, qt, m, n_rows);
      load_row_stats(lse_s, lse_b, qt, m, n_rows);
      load_row_stats(delta_s, delta_b, qt, m, n_rows);
      __syncthreads();  // Q, dO, lse, delta (and K, V on the first tile) visible

      gemm_abt<T, D>(Qs, Ks, Sf);    // S = Q K^T   [queries][keys]
      gemm_abt<T, D>(dOs, Vs, dPf);  // dP = dO V^T [queries][keys]
      __syncthreads();               // S, dP complete

      bwd_scores<T, true>(Sf, dPf, lse_s, delta_s, Ph, dSh, partial, m, n_rows, qt, kt, scale);
      __syncthreads();  // P, dS complete

      gemm_acc<T, D, true>(dv_acc, Ph, dOs);  // dV += P^T dO  (warp: keys 16*rs.., d ch*D/2..)
      gemm_acc<T, D, true>(dk_acc, dSh, Qs);  // dK += dS^T Q
      __syncthreads();                        // Q, dO, lse, delta, P, dS free for the next tile
    }
    __syncthreads();  // the S/dP region is free for staging (also with no tile visited)

    T* dk_b = dk + (static_cast<int64_t>(b) * L * H + h) * D;
    T* dv_b = dv + (static_cast<int64_t>(b) * L * H + h) * D;
    stage_acc<D>(stage, dk_acc, scale);
    __syncthreads();
    store_tile<T, D>(dk_b, static_cast<int64_t>(H) * D, stage, kt, m, n_rows);
    __syncthreads();
    stage_acc<D>(stage, dv_acc, 1.f);
    __syncthreads();
    store_tile<T, D>(dv_b, static_cast<int64_t>(H) * D, stage, kt, m, n_rows);
    __syncthreads();  // staging and K, V are rewritten for the next (b, h)
  }
#endif
}

// dQ. Grid (n_q_tiles, min(B*H, 65535)), block 256, dynamic smem Geo<D>::kBwdQSmem. See the top.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _sparse_attention_bwd_q_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const T* __restrict__ dO, const float* __restrict__ lse,
                                   const float* __restrict__ delta, T* __restrict__ dq, HeadStrides sq, HeadStrides sk,
                                   HeadStrides sv, HeadStrides sg, const int* __restrict__ kv_indptr,
                                   const int* __restrict__ kv_index, const int* __restrict__ kv_partial, int n_index,
                                   int n_tiles, int BH, int H, MaskSpec m, int n_rows, float scale) {
#ifdef DF_ATTN_NO_TENSOR_CORES
  __trap();
#else
  using G = Geo<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = reinterpret_cast<T*>(smem + G::kOpBytes);
  T* Ks = reinterpret_cast<T*>(smem + 2 * G::kOpBytes);
  T* Vs = reinterpret_cast<T*>(smem + 3 * G::kOpBytes);
  float* Sf = reinterpret_cast<float*>(smem + 4 * G::kOpBytes);
  float* dPf = reinterpret_cast<float*>(smem + 4 * G::kOpBytes + kScoreBytes);
  T* dSh = reinterpret_cast<T*>(smem + 4 * G::kOpBytes + 2 * kScoreBytes);
  float* lse_s = reinterpret_cast<float*>(smem + 4 * G::kOpBytes + 2 * kScoreBytes + kPBytes);
  float* delta_s = lse_s + kTile;
  float* stage = Sf;
  DF_DEVICE_CHECK(blockDim.x == kThreads && blockDim.y == 1 && blockDim.z == 1);

  const int qt = blockIdx.x;
  const int L = m.seq_len;
  const int beg = kv_indptr[qt], end = kv_indptr[qt + 1];
  check_csr(beg, end, n_index);

  for (int bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    const int b = bh / H, h = bh % H;
    const T* kb = k + b * sk.b + h * sk.h;
    const T* vb = v + b * sv.b + h * sv.h;

    load_tile<T, D>(Qs, q + b * sq.b + h * sq.h, sq.l, qt, m, n_rows);
    load_tile<T, D>(dOs, dO + b * sg.b + h * sg.h, sg.l, qt, m, n_rows);
    load_row_stats(lse_s, lse + static_cast<int64_t>(bh) * L, qt, m, n_rows);
    load_row_stats(delta_s, delta + static_cast<int64_t>(bh) * L, qt, m, n_rows);
    FragC dq_acc[G::kFrags];
#pragma unroll
    for (int n = 0; n < G::kFrags; ++n) wmma::fill_fragment(dq_acc[n], 0.f);

    for (int t = beg; t < end; ++t) {
      const int kt = kv_index[t];
      const bool partial = kv_partial[t] != 0;
      DF_DEVICE_CHECK(kt >= 0 && kt < n_tiles && (t == beg || kv_index[t - 1] < kt));
      load_tile<T, D>(Ks, kb, sk.l, kt, m, n_rows);
      load_tile<T, D>(Vs, vb, sv.l, kt, m, n_rows);
      __syncthreads();  // K, V (and Q, dO, lse, delta on the first tile) visible

      gemm_abt<T, D>(Qs, Ks, Sf);
      gemm_abt<T, D>(dOs, Vs, dPf);
      __syncthreads();  // S, dP complete

      bwd_scores<T, false>(Sf, dPf, lse_s, delta_s, nullptr, dSh, partial, m, n_rows, qt, kt, scale);
      __syncthreads();  // dS complete

      gemm_acc<T, D, false>(dq_acc, dSh, Ks);  // dQ += dS K  (warp: queries 16*rs.., d ch*D/2..)
      __syncthreads();                         // K, V, S, dP, dS free for the next tile
    }
    __syncthreads();

    stage_acc<D>(stage, dq_acc, scale);
    __syncthreads();
    store_tile<T, D>(dq + (static_cast<int64_t>(b) * L * H + h) * D, static_cast<int64_t>(H) * D, stage, qt, m,
                     n_rows);
    __syncthreads();  // staging, Q, dO, row stats are rewritten for the next (b, h)
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side.

constexpr int64_t kMaxGridY = 65535;

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& q, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda(), op, ": ", arg, ": expected a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == q.device(), op, ": ", arg, ": expected a tensor on ", q.device(), " (q's device), got ",
              t.device());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": q: expected a CUDA tensor, got a tensor on ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q: expected 4 dimensions [B, H, L, D], got shape ", q.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16, op,
              ": q: expected float16 or bfloat16 (the cuda kernels run on tensor cores; the triton backend serves "
              "float32), got ",
              st);
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": q: expected a head size D (dim 3) of 32, 64 or 128, got ", D);
  const at::Tensor* others[] = {&k, &v};
  const char* names[] = {"k", "v"};
  for (int i = 0; i < 2; ++i) {
    check_cuda_tensor(*others[i], q, op, names[i]);
    TORCH_CHECK(others[i]->sizes() == q.sizes(), op, ": ", names[i], ": expected the shape of q ", q.sizes(), ", got ",
                others[i]->sizes());
    TORCH_CHECK(others[i]->scalar_type() == st, op, ": ", names[i], ": expected q's dtype ", st, ", got ",
                others[i]->scalar_type());
  }
}

struct Mask {
  MaskSpec spec;
  int n_rows;
  int n_tiles;
};

Mask make_mask(int64_t kind, int64_t text_len, int64_t grid_h, int64_t grid_w, int64_t kernel, bool torus, int64_t L,
               int64_t block_m, int64_t block_n, double scale, const char* op) {
  TORCH_CHECK(block_m == kBM && block_n == kBN, op, ": block_m, block_n: the cuda kernels use ", kBM, " x ", kBN,
              " tiles (CXX_BLOCKS[\"cuda\"]), got ", block_m, " x ", block_n);
  TORCH_CHECK(kind >= 0 && kind <= 3, op, ": kind: expected 0 (full), 1 (row), 2 (column) or 3 (conv), got ", kind);
  TORCH_CHECK(text_len >= 0, op, ": text_len: expected an int >= 0, got ", text_len);
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, op, ": grid_h, grid_w: expected ints >= 1, got ", grid_h, " and ", grid_w);
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, op, ": kernel: expected an odd int >= 1, got ", kernel);
  TORCH_CHECK(std::isfinite(scale), op, ": scale: expected a finite float, got ", scale);
  const int64_t full = text_len + grid_h * grid_w;  // grid sizes are checked >= 1 and bounded below
  TORCH_CHECK(grid_h <= (1 << 20) && grid_w <= (1 << 20) && full <= std::numeric_limits<int>::max() - 2 * kTile, op,
              ": text_len + grid_h * grid_w: expected a layout below 2**31 positions, got ", text_len, " + ", grid_h,
              " * ", grid_w);
  TORCH_CHECK(L <= full, op, ": q: expected a sequence length L <= text_len + grid_h * grid_w = ", full,
              " (dim 2 of [B, H, L, D]), got ", L);
  MaskSpec spec{static_cast<int>(kind), static_cast<int>(text_len), static_cast<int>(grid_h),
                static_cast<int>(grid_w), static_cast<int>(kernel / 2), torus, static_cast<int>(L)};
  const int n_rows = processing_length(spec);
  return Mask{spec, n_rows, (n_rows + kTile - 1) / kTile};
}

// int32 CSR arrays on q's device: indptr [n_tiles + 1], index and partial of equal length.
void check_csr_arrays(const at::Tensor& indptr, const at::Tensor& index, const at::Tensor& partial, const at::Tensor& q,
                      int n_tiles, const char* op, const char* indptr_name, const char* index_name,
                      const char* partial_name, const char* tiles_what) {
  const at::Tensor* ts[] = {&indptr, &index, &partial};
  const char* names[] = {indptr_name, index_name, partial_name};
  for (int i = 0; i < 3; ++i) {
    check_cuda_tensor(*ts[i], q, op, names[i]);
    TORCH_CHECK(ts[i]->scalar_type() == at::kInt, op, ": ", names[i], ": expected int32, got ", ts[i]->scalar_type());
    TORCH_CHECK(ts[i]->dim() == 1, op, ": ", names[i], ": expected 1 dimension, got shape ", ts[i]->sizes());
  }
  TORCH_CHECK(indptr.numel() == n_tiles + 1, op, ": ", indptr_name, ": expected ", tiles_what, " + 1 = ", n_tiles + 1,
              " entries (", tiles_what, " = ceil(n_rows / 64)), got ", indptr.numel());
  TORCH_CHECK(index.numel() == partial.numel(), op, ": ", partial_name, ": expected as many entries as ", index_name,
              " (", index.numel(), "), got ", partial.numel());
  TORCH_CHECK(index.numel() <= std::numeric_limits<int>::max(), op, ": ", index_name, ": too many entries (",
              index.numel(), ")");
}

// A [B, H, L, D] tensor the vector loaders can read: stride(-1) == 1, other strides multiples of 8
// elements (size-1 dims excepted) and a 16-byte aligned pointer; otherwise a contiguous copy.
at::Tensor vector_ready(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

HeadStrides head_strides(const at::Tensor& t) { return HeadStrides{t.stride(0), t.stride(1), t.stride(2)}; }

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Opts the kernel in to its (constant) dynamic smem size: above the 48 KiB default for every D. Checked
// against the device first, and the device must have bf16/fp16 tensor-core wmma (sm_80+).
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, const at::Tensor& q, const char* op) {
  const int dev = q.get_device();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, dev);
  TORCH_CHECK(major >= 8, op, ": the cuda kernels need compute capability 8.0 or newer (bf16/fp16 tensor cores), got ",
              major, ".x on ", q.device(), "; use the triton backend");
  const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  TORCH_CHECK(bytes <= limit, op, ": head size ", q.size(3), " needs ", bytes, " bytes of shared memory per block, ",
              q.device(), " allows ", limit, "; use the triton backend");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Runs the lambda __VA_ARGS__ with T (the 16-bit cuda type) and kD (the head size) bound, like AT_DISPATCH.
// check_qkv has accepted only float16 / bfloat16 and D in {32, 64, 128} before.
#define DF_ATTN_DISPATCH_D(D_, ...)  \
  switch (D_) {                      \
    case 32: {                       \
      constexpr int kD = 32;         \
      __VA_ARGS__();                 \
      break;                         \
    }                                \
    case 64: {                       \
      constexpr int kD = 64;         \
      __VA_ARGS__();                 \
      break;                         \
    }                                \
    default: {                       \
      constexpr int kD = 128;        \
      __VA_ARGS__();                 \
      break;                         \
    }                                \
  }
#define DF_ATTN_DISPATCH(ST, D_, ...)        \
  do {                                       \
    if ((ST) == at::kHalf) {                 \
      using T = __half;                      \
      DF_ATTN_DISPATCH_D(D_, __VA_ARGS__)    \
    } else {                                 \
      using T = __nv_bfloat16;               \
      DF_ATTN_DISPATCH_D(D_, __VA_ARGS__)    \
    }                                        \
  } while (0)

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in, const at::Tensor& kv_indptr_in,
                                                             const at::Tensor& kv_index_in,
                                                             const at::Tensor& kv_partial_in, int64_t kind,
                                                             int64_t text_len, int64_t grid_h, int64_t grid_w,
                                                             int64_t kernel, bool torus, double scale, int64_t block_m,
                                                             int64_t block_n) {
  constexpr const char* op = "sparse_attention_fwd";
  check_qkv(q_in, k_in, v_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3);
  const Mask mk = make_mask(kind, text_len, grid_h, grid_w, kernel, torus, L, block_m, block_n, scale, op);
  check_csr_arrays(kv_indptr_in, kv_index_in, kv_partial_in, q_in, mk.n_tiles, op, "kv_indptr", "kv_index",
                   "kv_partial", "n_q_tiles");
  at::Tensor out = at::empty({B, L, H, D}, q_in.options());
  at::Tensor lse = at::empty({B, H, L}, q_in.options().dtype(at::kFloat));
  if (B * H == 0 || L == 0) return {out.transpose(1, 2), lse};
  TORCH_CHECK(B * H <= std::numeric_limits<int>::max(), op, ": q: expected B * H < 2**31, got ", B * H);

  const at::Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const at::Tensor kv_indptr = kv_indptr_in.contiguous(), kv_index = kv_index_in.contiguous(),
                   kv_partial = kv_partial_in.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(mk.n_tiles), static_cast<unsigned>(std::min(B * H, kMaxGridY)));
  DF_ATTN_DISPATCH(q.scalar_type(), D, [&] {
    auto kern = _sparse_attention_fwd_kernel<T, kD>;
    constexpr int smem = Geo<kD>::kFwdSmem;
    allow_smem(kern, smem, q, op);
    kern<<<grid, kThreads, smem, stream>>>(
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
        reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<T*>(out.data_ptr()), lse.data_ptr<float>(),
        head_strides(q), head_strides(k), head_strides(v), kv_indptr.data_ptr<int>(), kv_index.data_ptr<int>(),
        kv_partial.data_ptr<int>(), static_cast<int>(kv_index.numel()), mk.n_tiles, static_cast<int>(B * H),
        static_cast<int>(H), mk.spec, mk.n_rows, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.transpose(1, 2), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse_in, const at::Tensor& kv_indptr_in, const at::Tensor& kv_index_in,
    const at::Tensor& kv_partial_in, const at::Tensor& q_indptr_in, const at::Tensor& q_index_in,
    const at::Tensor& q_partial_in, int64_t kind, int64_t text_len, int64_t grid_h, int64_t grid_w, int64_t kernel,
    bool torus, double scale, int64_t block_m, int64_t block_n) {
  constexpr const char* op = "sparse_attention_bwd";
  check_qkv(q_in, k_in, v_in, op);
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3);
  check_cuda_tensor(grad_out_in, q_in, op, "grad_out");
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), op, ": grad_out: expected the shape of q ", q_in.sizes(), ", got ",
              grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.is_floating_point(), op, ": grad_out: expected a floating-point tensor, got ",
              grad_out_in.scalar_type());
  check_cuda_tensor(out, q_in, op, "out");
  TORCH_CHECK(out.sizes() == q_in.sizes(), op, ": out: expected the shape of q ", q_in.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q_in.scalar_type(), op, ": out: expected q's dtype ", q_in.scalar_type(), ", got ",
              out.scalar_type());
  check_cuda_tensor(lse_in, q_in, op, "lse");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse: expected float32, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == L, op,
              ": lse: expected shape [B, H, L] = [", B, ", ", H, ", ", L, "], got ", lse_in.sizes());
  const Mask mk = make_mask(kind, text_len, grid_h, grid_w, kernel, torus, L, block_m, block_n, scale, op);
  check_csr_arrays(kv_indptr_in, kv_index_in, kv_partial_in, q_in, mk.n_tiles, op, "kv_indptr", "kv_index",
                   "kv_partial", "n_q_tiles");
  check_csr_arrays(q_indptr_in, q_index_in, q_partial_in, q_in, mk.n_tiles, op, "q_indptr", "q_index", "q_partial",
                   "n_k_tiles");
  at::Tensor dq = at::empty({B, L, H, D}, q_in.options());
  at::Tensor dk = at::empty({B, L, H, D}, q_in.options());
  at::Tensor dv = at::empty({B, L, H, D}, q_in.options());
  if (B * H == 0 || L == 0) return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
  TORCH_CHECK(B * H <= std::numeric_limits<int>::max(), op, ": q: expected B * H < 2**31, got ", B * H);

  const at::Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  // grad_out in q's dtype (the tensor-core operand type), any layout.
  const at::Tensor g = vector_ready(grad_out_in.scalar_type() == q.scalar_type() ? grad_out_in
                                                                                  : grad_out_in.to(q.scalar_type()));
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor kv_indptr = kv_indptr_in.contiguous(), kv_index = kv_index_in.contiguous(),
                   kv_partial = kv_partial_in.contiguous();
  const at::Tensor q_indptr = q_indptr_in.contiguous(), q_index = q_index_in.contiguous(),
                   q_partial = q_partial_in.contiguous();
  at::Tensor delta = at::empty({B, H, L}, q_in.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = B * H * L;
  const dim3 grid_tiles(static_cast<unsigned>(mk.n_tiles), static_cast<unsigned>(std::min(B * H, kMaxGridY)));
  const int64_t delta_blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  TORCH_CHECK(delta_blocks <= std::numeric_limits<int>::max(), op, ": q: too many rows (B * H * L = ", rows, ")");

  DF_ATTN_DISPATCH(q.scalar_type(), D, [&] {
    _sparse_attention_bwd_delta_kernel<T, kD><<<static_cast<unsigned>(delta_blocks), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(g.data_ptr()), reinterpret_cast<const T*>(out.data_ptr()), delta.data_ptr<float>(),
        head_strides(g), g.stride(3), head_strides(out), out.stride(3), rows, static_cast<int>(H),
        static_cast<int>(L));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto kv_kern = _sparse_attention_bwd_kv_kernel<T, kD>;
    constexpr int kv_smem = Geo<kD>::kBwdKvSmem;
    allow_smem(kv_kern, kv_smem, q, op);
    kv_kern<<<grid_tiles, kThreads, kv_smem, stream>>>(
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
        reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(g.data_ptr()), lse.data_ptr<float>(),
        delta.data_ptr<float>(), reinterpret_cast<T*>(dk.data_ptr()), reinterpret_cast<T*>(dv.data_ptr()),
        head_strides(q), head_strides(k), head_strides(v), head_strides(g), q_indptr.data_ptr<int>(),
        q_index.data_ptr<int>(), q_partial.data_ptr<int>(), static_cast<int>(q_index.numel()), mk.n_tiles,
        static_cast<int>(B * H), static_cast<int>(H), mk.spec, mk.n_rows, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    auto q_kern = _sparse_attention_bwd_q_kernel<T, kD>;
    constexpr int q_smem = Geo<kD>::kBwdQSmem;
    allow_smem(q_kern, q_smem, q, op);
    q_kern<<<grid_tiles, kThreads, q_smem, stream>>>(
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
        reinterpret_cast<const T*>(v.data_ptr()), reinterpret_cast<const T*>(g.data_ptr()), lse.data_ptr<float>(),
        delta.data_ptr<float>(), reinterpret_cast<T*>(dq.data_ptr()), head_strides(q), head_strides(k),
        head_strides(v), head_strides(g), kv_indptr.data_ptr<int>(), kv_index.data_ptr<int>(),
        kv_partial.data_ptr<int>(), static_cast<int>(kv_index.numel()), mk.n_tiles, static_cast<int>(B * H),
        static_cast<int>(H), mk.spec, mk.n_rows, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("sparse_attention_fwd", &dalle_fast::sparse_attention_fwd_cuda);
  m.impl("sparse_attention_bwd", &dalle_fast::sparse_attention_bwd_cuda);
}
