// CUDA C++ backend of the Gumbel-softmax family: gumbel_noise, gumbel_softmax_fwd, gumbel_softmax_bwd,
// gumbel_argmax (schemas in csrc/ops.cpp, semantics in DESIGN.md sections 2-3).
//
// All per-element math (Philox, uniform, Gumbel guard, softmax-state merges, argmax order) comes from
// dalle_fast/math.h, which the C++ CPU backend shares; this file only maps the work onto threads.
//
// Views and element numbers. The logits are seen as [outer, K, inner] around the reduction dim
// (made contiguous first: a non-contiguous input pays one copy). Element (o, k, i) has the flat index
// f = (o*K + k)*inner + i, its element number is n = offset + f, and its noise is lane n % 4 of Philox
// at counter n / 4. Every kernel works on "quads" so that one Philox call serves four elements.
//
// Row layout (inner == 1: dim is the last dim, e.g. the sampler's [N, 8192] dim=-1).
//   One block per row (grid-stride over rows). The row's element numbers [offset + o*K, +K) are cut at
//   multiples of 4 (Philox-aligned quads, the first and last ones possibly partial), so every Philox
//   call is used for all four of its lanes whatever the offset. When offset % 4 == 0 the quads are also
//   16-byte (fp32) / 8-byte (fp16, bf16) aligned in memory and full quads are loaded and stored as one
//   vector; otherwise scalar accesses (still coalesced). A thread owns quads tid, tid + blockDim, ...
//   - soft forward: if the row fits in shared memory (<= 96 KiB of fp32 scores), pass 1 reads the
//     logits once, computes z = (x + g) / tau into smem and the thread's max; pass 1b turns the
//     thread's z into e = exp(z - m_thread) and its sum (one exp per element); a block reduction of
//     (m, s) (warp shuffles, then one value per warp through smem) gives (M, S); pass 2 writes
//     y = e * exp(m_thread - M) / S from smem. Logits are read once and Philox runs once per quad.
//     A thread only reads back its own quads, so the cache needs no barrier. Rows too long for the
//     cache use two passes over global memory with the noise recomputed (online merge per element).
//   - backward: the same with z and dy cached (2 floats per element: rows up to K ~ 12288 in the
//     96 KiB of kRowCacheBytes; the forward's 1 float per element reaches K ~ 24576), s and t = sum dy * e reduced together, dx = (1/tau) * y * (dy - T/S).
//   - hard forward / argmax: one read pass with a running argmax (x + g, torch.argmax order), a block
//     reduction, then the one-hot is written directly (no scores needed) or the index is stored.
//   Expected bandwidth: the minimum bytes (logits read once, output written once, dy read once) move
//   exactly once when the row is cached; ~4 quads per thread and 2-4 resident blocks per SM keep enough
//   loads in flight. The per-element arithmetic (Philox/4 + two accurate logf + one exp, ~60-80 ops)
//   is close to the H200's issue rate at copy bandwidth for fp32 and above it for fp16/bf16, so fp16
//   is expected to be issue-bound rather than bandwidth-bound.
//
// Column layout (inner > 1, e.g. the dVAE's [B, 8192, 32, 32] dim=1: inner = 1024).
//   A block is TX x TY threads: TX along inner, each thread owning the 4 consecutive inner positions
//   i0..i0+3 (a quad: one vector access when inner % 4 == 0, one Philox call when additionally
//   offset % 4 == 0, else two calls whose lanes are selected), TY along K (k = ty, ty + TY, ...).
//   A warp covers 32/TX rows of K of 16*TX bytes (fp32) each, so loads use whole sectors. Each
//   thread keeps one softmax state (or argmax) per owned column; the TY states of a column are merged
//   by xor shuffles inside the warp and then through smem across warps (at most 16 partials per
//   column), every thread merging them in the same order so all agree. Grid: x over column tiles of
//   4*TX columns, y over outer (both grid-stride).
//   - soft forward and backward: two passes over global memory, the second recomputing the noise.
//     A tile of all K scores (4*TX columns x K x 4 bytes = 512 KiB for TX = 4, K = 8192) does not fit
//     on one SM, so this simple scheme reads the logits (and dy) twice and runs Philox twice: expected
//     ~2/3 of copy bandwidth at best, less where the doubled arithmetic dominates. The way to the goal
//     (85%) is a thread-block cluster splitting K over up to 16 SMs, each caching its slice in smem and
//     exchanging only the (m, s, t) partials through distributed shared memory: not done yet.
//   - hard forward / argmax: one read pass, the reduction, then the one-hot write: minimum bytes.
//
// gumbel_noise: grid-stride over the Philox-aligned quads of [offset, offset + numel), one call per
// quad, masked edges, vector stores when offset % 4 == 0.
//
// dtypes: fp32, fp16, bf16 logits (fp32 math, output in the logits' dtype); the backward's grad in the
// logits' dtype or, when it differs, converted to fp32 on the host first. Indices and offsets that
// can pass 2**31 are int64. Debug builds (DALLE_FAST_DEBUG) check index ranges and launch shapes
// inside the kernels and trap on failure.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "dalle_fast/launch.h"
#include "dalle_fast/math.h"

#include "dalle_fast/device_check.h"

namespace dalle_fast {
namespace {

// ------------------------------------------------------------------------------------------------
// Element access: raw storage types and 4-element vectors.

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Raw = float;
  using Vec = float4;  // 16 bytes
  static __device__ __forceinline__ float to_f(Raw r) { return r; }
  static __device__ __forceinline__ Raw from_f(float f) { return f; }
  static __device__ __forceinline__ void unpack(Vec w, float v[4]) {
    v[0] = w.x;
    v[1] = w.y;
    v[2] = w.z;
    v[3] = w.w;
  }
  static __device__ __forceinline__ Vec pack(const float v[4]) { return make_float4(v[0], v[1], v[2], v[3]); }
};

struct Elem16 {
  using Raw = uint16_t;
  using Vec = uint2;  // 8 bytes: element 0 in the low half of .x (little endian)
};

template <>
struct Elem<c10::Half> : Elem16 {
  static __device__ __forceinline__ float to_f(Raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ Raw from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static __device__ __forceinline__ void unpack(Vec w, float v[4]) {
    v[0] = to_f(static_cast<Raw>(w.x & 0xffffu));
    v[1] = to_f(static_cast<Raw>(w.x >> 16));
    v[2] = to_f(static_cast<Raw>(w.y & 0xffffu));
    v[3] = to_f(static_cast<Raw>(w.y >> 16));
  }
  static __device__ __forceinline__ Vec pack(const float v[4]) {
    return make_uint2(uint32_t(from_f(v[0])) | (uint32_t(from_f(v[1])) << 16),
                      uint32_t(from_f(v[2])) | (uint32_t(from_f(v[3])) << 16));
  }
};

template <>
struct Elem<c10::BFloat16> : Elem16 {
  static __device__ __forceinline__ float to_f(Raw r) { return __uint_as_float(uint32_t(r) << 16); }
  static __device__ __forceinline__ Raw from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  static __device__ __forceinline__ void unpack(Vec w, float v[4]) {
    v[0] = __uint_as_float(w.x << 16);
    v[1] = __uint_as_float(w.x & 0xffff0000u);
    v[2] = __uint_as_float(w.y << 16);
    v[3] = __uint_as_float(w.y & 0xffff0000u);
  }
  static __device__ __forceinline__ Vec pack(const float v[4]) {
    return make_uint2(uint32_t(from_f(v[0])) | (uint32_t(from_f(v[1])) << 16),
                      uint32_t(from_f(v[2])) | (uint32_t(from_f(v[3])) << 16));
  }
};

template <typename T>
using RawOf = typename Elem<T>::Raw;

// Loads the quad at flat index f0 (lanes f0 .. f0+3) as fp32; lanes whose flat index is outside
// [lo, hi) get `fill`. `vec` says a whole-quad vector load is allowed (f0 % 4 == 0 and an aligned base:
// the caller checks both); it is used only when all four lanes are inside.
template <typename T>
__device__ __forceinline__ void load_quad(const RawOf<T>* __restrict__ p, int64_t f0, int64_t lo, int64_t hi,
                                          bool vec, float fill, float v[4]) {
  if (vec && f0 >= lo && f0 + 4 <= hi) {
    DF_DEVICE_CHECK((f0 & 3) == 0);
    Elem<T>::unpack(*reinterpret_cast<const typename Elem<T>::Vec*>(p + f0), v);
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t f = f0 + e;
    v[e] = (f >= lo && f < hi) ? Elem<T>::to_f(p[f]) : fill;
  }
}

template <typename T>
__device__ __forceinline__ void store_quad(RawOf<T>* __restrict__ p, int64_t f0, int64_t lo, int64_t hi, bool vec,
                                           const float v[4]) {
  if (vec && f0 >= lo && f0 + 4 <= hi) {
    DF_DEVICE_CHECK((f0 & 3) == 0);
    *reinterpret_cast<typename Elem<T>::Vec*>(p + f0) = Elem<T>::pack(v);
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t f = f0 + e;
    if (f >= lo && f < hi) p[f] = Elem<T>::from_f(v[e]);
  }
}

// ------------------------------------------------------------------------------------------------
// Noise of four consecutive element numbers.

// n0 = 4 * counter: the four lanes of one Philox call.
__device__ __forceinline__ void gumbel_quad_aligned(uint64_t seed, uint64_t counter, float g[4]) {
  const Philox4 r = philox_block(seed, counter);
#pragma unroll
  for (int e = 0; e < 4; ++e) g[e] = gumbel_from_uint32(r.x[e]);
}

__device__ __forceinline__ uint32_t philox_lane(const Philox4& r, unsigned lane) {
  return lane == 0 ? r.x[0] : lane == 1 ? r.x[1] : lane == 2 ? r.x[2] : r.x[3];
}

// Any n0: one Philox call when n0 % 4 == 0, else two (lanes n0 % 4 .. 3 of the first, the rest of the
// second), selected without dynamic register indexing.
__device__ __forceinline__ void gumbel_quad(uint64_t seed, uint64_t n0, float g[4]) {
  const uint64_t c = n0 >> 2;
  const unsigned sh = static_cast<unsigned>(n0 & 3);
  if (sh == 0) {
    gumbel_quad_aligned(seed, c, g);
    return;
  }
  const Philox4 a = philox_block(seed, c);
  const Philox4 b = philox_block(seed, c + 1);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const unsigned l = sh + e;  // 1 .. 6
    const uint32_t bits = l < 4 ? philox_lane(a, l) : philox_lane(b, l - 4);
    g[e] = gumbel_from_uint32(bits);
  }
}

// ------------------------------------------------------------------------------------------------
// Reductions.

__device__ __forceinline__ SoftmaxStats shfl_xor(SoftmaxStats a, int d) {
  return SoftmaxStats{__shfl_xor_sync(0xffffffffu, a.m, d), __shfl_xor_sync(0xffffffffu, a.s, d),
                      __shfl_xor_sync(0xffffffffu, a.t, d)};
}

__device__ __forceinline__ ArgMaxState shfl_xor(ArgMaxState a, int d) {
  return ArgMaxState{__shfl_xor_sync(0xffffffffu, a.v, d),
                     static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(a.i), d))};
}

__device__ __forceinline__ SoftmaxStats combine(SoftmaxStats a, SoftmaxStats b) { return softmax_stats_combine(a, b); }
__device__ __forceinline__ ArgMaxState combine(ArgMaxState a, ArgMaxState b) { return argmax_combine(a, b); }
__device__ __forceinline__ SoftmaxStats identity_of(SoftmaxStats) { return softmax_stats_init(); }
__device__ __forceinline__ ArgMaxState identity_of(ArgMaxState) { return argmax_init(); }

// Butterfly over the lanes that differ in the bits of [from, 32): every such lane ends with the merge.
template <typename S>
__device__ __forceinline__ S warp_allreduce(S v, int from) {
#pragma unroll
  for (int d = 16; d >= 1; d >>= 1)
    if (d >= from) v = combine(v, shfl_xor(v, d));
  return v;
}

// Block-wide merge of one state per thread; every thread gets the result. red: >= 32 entries of smem.
// blockDim.x must be a multiple of 32 (full warps) and blockDim.y == 1.
template <typename S>
__device__ __forceinline__ S block_allreduce(S v, S* red) {
  DF_DEVICE_CHECK(blockDim.x % 32 == 0 && blockDim.y == 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_allreduce(v, 1);
  __syncthreads();  // the previous use of red is over
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : identity_of(v);
  return warp_allreduce(v, 1);
}

// Merge of the states of the threads sharing a column quad in a TX x TY block (tid = ty*TX + tx, TX and
// TY powers of two, TX*TY a multiple of 32): lanes of a warp with the same tx differ in bits >= TX;
// after the butterfly one partial per (warp, tx) (per (ty, tx) when TX >= 32) goes to smem, and every
// thread merges the partials of its tx in the same order. red: >= kColPartials * 4 entries.
constexpr int kColThreads = 512;
constexpr int kColPartials = 512;  // partials per block (P * TX <= 512, see col_config)

template <typename S>
__device__ __forceinline__ void column_allreduce(S (&v)[4], S* red) {
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TX + tx, lane = tid & 31, warp = tid >> 5;
  DF_DEVICE_CHECK((TX * TY) % 32 == 0 && (TX & (TX - 1)) == 0 && (TY & (TY - 1)) == 0);
#pragma unroll
  for (int c = 0; c < 4; ++c) v[c] = warp_allreduce(v[c], TX);  // no step when TX >= 32
  const int P = TX < 32 ? (TX * TY) / 32 : TY;                     // partials per column
  const int p = TX < 32 ? warp : ty;
  DF_DEVICE_CHECK(P * TX <= kColPartials && P <= 16);
  __syncthreads();  // the previous use of red is over
  if (TX >= 32 || lane < TX) {
#pragma unroll
    for (int c = 0; c < 4; ++c) red[(p * TX + tx) * 4 + c] = v[c];
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    S acc = identity_of(v[c]);
    for (int q = 0; q < P; ++q) acc = combine(acc, red[(q * TX + tx) * 4 + c]);
    v[c] = acc;
  }
}

// ------------------------------------------------------------------------------------------------
// Row layout helpers.

// The Philox-aligned quads covering row `row` (flat [r0, r1)): counters c_lo .. c_lo + nq - 1; quad j
// holds flat indices f0 = 4*(c_lo + j) - offset .. f0 + 3 (the first may start before r0, the last
// end after r1: those lanes are masked).
struct RowQuads {
  int64_t r0, r1, c_lo, nq;
};

__device__ __forceinline__ RowQuads row_quads(int64_t row, int64_t K, int64_t offset) {
  const int64_t r0 = row * K, r1 = r0 + K;
  const int64_t c_lo = (offset + r0) >> 2, c_hi = (offset + r1 - 1) >> 2;
  return RowQuads{r0, r1, c_lo, c_hi - c_lo + 1};
}

// ------------------------------------------------------------------------------------------------
// Kernels.

// gumbel_noise. Grid-stride over the quads of element numbers [offset, offset + numel): quad j is
// counter c = offset/4 + j, flat indices 4c - offset .. +3 (masked to [0, numel)).
template <typename T>
__global__ void __launch_bounds__(256)
    _gumbel_noise_kernel(RawOf<T>* __restrict__ out, int64_t numel, uint64_t seed, int64_t offset, bool vec) {
  const int64_t c_lo = offset >> 2;
  const int64_t nq = ((offset + numel - 1) >> 2) - c_lo + 1;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nq; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = c_lo + j;
    const int64_t f0 = 4 * c - offset;
    float g[4];
    gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
    store_quad<T>(out, f0, 0, numel, vec, g);
  }
}

// Soft forward, row layout. One block computes rows blockIdx.x, blockIdx.x + gridDim.x, ... of the
// [outer, K] view: y[o, k] = exp(z_k - M) / S with z = (x + g) * inv_tau, M = max z, S = sum exp(z - M).
// Backward of this op: gumbel_softmax_bwd. block: (threads, 1), threads a power of two >= 32.
// cache: dynamic smem of cache_quads float4 when `cached` (rows with nq <= cache_quads), else unused.
// vec: offset % 4 == 0 and x, y 16-/8-byte aligned (quads are then aligned in memory too).
template <typename T>
__global__ void __launch_bounds__(512)
    _gumbel_softmax_fwd_row_kernel(const RawOf<T>* __restrict__ x, RawOf<T>* __restrict__ y, int64_t outer, int64_t K,
                                   uint64_t seed, int64_t offset, float inv_tau, bool cached, int64_t cache_quads,
                                   bool vec) {
  extern __shared__ float4 cache[];
  __shared__ SoftmaxStats red[32];
  for (int64_t row = blockIdx.x; row < outer; row += gridDim.x) {
    const RowQuads rq = row_quads(row, K, offset);
    DF_DEVICE_CHECK(!cached || rq.nq <= cache_quads);
    SoftmaxStats st = softmax_stats_init();
    if (cached) {
      float m = -INFINITY;
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
        float v[4], g[4];
        load_quad<T>(x, f0, rq.r0, rq.r1, vec, -INFINITY, v);
        gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = (v[e] + g[e]) * inv_tau;  // masked lanes stay -inf: they add 0 below
          m = fmaxf(m, v[e]);              // NaN ignored here, caught by the sum
        }
        cache[j] = make_float4(v[0], v[1], v[2], v[3]);
      }
      float s = 0.f;
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {  // the thread's own quads: no barrier
        float4 z = cache[j];
        z.x = exp_below_max(z.x, m);
        z.y = exp_below_max(z.y, m);
        z.z = exp_below_max(z.z, m);
        z.w = exp_below_max(z.w, m);
        s += (z.x + z.y) + (z.z + z.w);
        cache[j] = z;
      }
      st = SoftmaxStats{m, s, 0.f};
      const SoftmaxStats tot = block_allreduce(st, red);
      const float scale = exp_below_max(m, tot.m) / tot.s;
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t f0 = 4 * (rq.c_lo + j) - offset;
        const float4 e = cache[j];
        const float o[4] = {e.x * scale, e.y * scale, e.z * scale, e.w * scale};
        store_quad<T>(y, f0, rq.r0, rq.r1, vec, o);
      }
    } else {
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
        float v[4], g[4];
        load_quad<T>(x, f0, rq.r0, rq.r1, vec, -INFINITY, v);
        gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
        for (int e = 0; e < 4; ++e) st = softmax_stats_combine(st, softmax_stats_of((v[e] + g[e]) * inv_tau, 0.f));
      }
      const SoftmaxStats tot = block_allreduce(st, red);
      const float inv_s = 1.f / tot.s;
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
        float v[4], g[4];
        load_quad<T>(x, f0, rq.r0, rq.r1, vec, -INFINITY, v);
        gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = exp_below_max((v[e] + g[e]) * inv_tau, tot.m) * inv_s;
        store_quad<T>(y, f0, rq.r0, rq.r1, vec, v);
      }
    }
  }
}

// Hard forward (WRITE_INDEX = false: y = one_hot(argmax_k (x + g)) in T) and gumbel_argmax
// (WRITE_INDEX = true: idx[o] = argmax_k (x + g), int64), row layout. One block per row (grid-stride),
// one read pass with a running argmax in torch.argmax order, a block reduction, then the write.
// The argmax is taken on x + g: tau > 0 does not move it, and this is what the reference compares.
template <typename T, bool WRITE_INDEX>
__global__ void __launch_bounds__(512)
    _gumbel_argmax_row_kernel(const RawOf<T>* __restrict__ x, RawOf<T>* __restrict__ y, int64_t* __restrict__ idx,
                              int64_t outer, int64_t K, uint64_t seed, int64_t offset, bool vec) {
  __shared__ ArgMaxState red[32];
  for (int64_t row = blockIdx.x; row < outer; row += gridDim.x) {
    const RowQuads rq = row_quads(row, K, offset);
    ArgMaxState best = argmax_init();
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
      const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
      float v[4], g[4];
      load_quad<T>(x, f0, rq.r0, rq.r1, vec, 0.f, v);
      gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t k = f0 + e - rq.r0;
        if (k >= 0 && k < K) best = argmax_combine(best, ArgMaxState{v[e] + g[e], k});
      }
    }
    best = block_allreduce(best, red);
    DF_DEVICE_CHECK(best.i >= 0 && best.i < K);
    if constexpr (WRITE_INDEX) {
      if (threadIdx.x == 0) idx[row] = best.i;
    } else {
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t f0 = 4 * (rq.c_lo + j) - offset;
        float o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) o[e] = (f0 + e - rq.r0 == best.i) ? 1.f : 0.f;
        store_quad<T>(y, f0, rq.r0, rq.r1, vec, o);
      }
    }
  }
}

// Backward, row layout. One block per row (grid-stride). With y = softmax(z), z = (x + g) * inv_tau:
//   dx = inv_tau * y * (dy - sum_k dy_k y_k) = inv_tau * e/S * (dy - T/S),
//   e = exp(z - M), S = sum e, T = sum dy * e.
// cached: z then e and dy of the thread's quads in dynamic smem (2 * cache_quads float4); else two
// passes over global memory (noise recomputed). vec: offset % 4 == 0 and x, dx aligned; vec_dy: also dy.
template <typename T, typename G>
__global__ void __launch_bounds__(512)
    _gumbel_softmax_bwd_row_kernel(const RawOf<G>* __restrict__ dy, const RawOf<T>* __restrict__ x,
                                   RawOf<T>* __restrict__ dx, int64_t outer, int64_t K, uint64_t seed, int64_t offset,
                                   float inv_tau, bool cached, int64_t cache_quads, bool vec, bool vec_dy) {
  extern __shared__ float4 cache[];  // [cache_quads] z / e, then [cache_quads] dy
  __shared__ SoftmaxStats red[32];
  float4* dcache = cache + cache_quads;
  for (int64_t row = blockIdx.x; row < outer; row += gridDim.x) {
    const RowQuads rq = row_quads(row, K, offset);
    DF_DEVICE_CHECK(!cached || rq.nq <= cache_quads);
    if (cached) {
      float m = -INFINITY;
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
        float v[4], w[4], g[4];
        load_quad<T>(x, f0, rq.r0, rq.r1, vec, -INFINITY, v);
        load_quad<G>(dy, f0, rq.r0, rq.r1, vec && vec_dy, 0.f, w);
        gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = (v[e] + g[e]) * inv_tau;
          m = fmaxf(m, v[e]);
        }
        cache[j] = make_float4(v[0], v[1], v[2], v[3]);
        dcache[j] = make_float4(w[0], w[1], w[2], w[3]);
      }
      float s = 0.f, t = 0.f;
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        float4 z = cache[j];
        const float4 w = dcache[j];
        z.x = exp_below_max(z.x, m);
        z.y = exp_below_max(z.y, m);
        z.z = exp_below_max(z.z, m);
        z.w = exp_below_max(z.w, m);
        s += (z.x + z.y) + (z.z + z.w);
        t += (w.x * z.x + w.y * z.y) + (w.z * z.z + w.w * z.w);
        cache[j] = z;
      }
      const SoftmaxStats tot = block_allreduce(SoftmaxStats{m, s, t}, red);
      const float inv_s = 1.f / tot.s;
      const float scale = exp_below_max(m, tot.m) * inv_s;  // e_thread * scale = y
      const float dot = tot.t * inv_s;                      // sum dy * y
#pragma unroll 4
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t f0 = 4 * (rq.c_lo + j) - offset;
        const float4 e = cache[j], w = dcache[j];
        const float o[4] = {inv_tau * (e.x * scale) * (w.x - dot), inv_tau * (e.y * scale) * (w.y - dot),
                            inv_tau * (e.z * scale) * (w.z - dot), inv_tau * (e.w * scale) * (w.w - dot)};
        store_quad<T>(dx, f0, rq.r0, rq.r1, vec, o);
      }
    } else {
      SoftmaxStats st = softmax_stats_init();
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
        float v[4], w[4], g[4];
        load_quad<T>(x, f0, rq.r0, rq.r1, vec, -INFINITY, v);
        load_quad<G>(dy, f0, rq.r0, rq.r1, vec && vec_dy, 0.f, w);
        gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
        for (int e = 0; e < 4; ++e) st = softmax_stats_combine(st, softmax_stats_of((v[e] + g[e]) * inv_tau, w[e]));
      }
      const SoftmaxStats tot = block_allreduce(st, red);
      const float inv_s = 1.f / tot.s;
      const float dot = tot.t * inv_s;
      for (int64_t j = threadIdx.x; j < rq.nq; j += blockDim.x) {
        const int64_t c = rq.c_lo + j, f0 = 4 * c - offset;
        float v[4], w[4], g[4];
        load_quad<T>(x, f0, rq.r0, rq.r1, vec, -INFINITY, v);
        load_quad<G>(dy, f0, rq.r0, rq.r1, vec && vec_dy, 0.f, w);
        gumbel_quad_aligned(seed, static_cast<uint64_t>(c), g);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float yk = exp_below_max((v[e] + g[e]) * inv_tau, tot.m) * inv_s;
          v[e] = inv_tau * yk * (w[e] - dot);
        }
        store_quad<T>(dx, f0, rq.r0, rq.r1, vec, v);
      }
    }
  }
}

// Column layout: the thread's quad of inner positions i0 .. i0+3 of tile `tile`, and how many exist.
struct ColQuad {
  int64_t i0;
  int nvalid;  // 0 .. 4
};

__device__ __forceinline__ ColQuad col_quad(int64_t tile, int64_t inner) {
  const int64_t i0 = (tile * blockDim.x + threadIdx.x) * 4;
  const int64_t left = inner - i0;
  return ColQuad{i0, left <= 0 ? 0 : (left >= 4 ? 4 : static_cast<int>(left))};
}

// Soft forward, column layout ([outer, K, inner], inner > 1). Block (TX, TY): tile `tile` of columns
// [4*TX*tile, 4*TX*(tile+1)) of outer index o, all K (see the file comment). Grid (tiles, outer), both
// grid-stride. Pass 1: per-column online softmax state over k = ty, ty + TY, ...; column merge; pass 2
// recomputes z and writes y = exp(z - M) / S. vec: inner % 4 == 0 and x, y aligned.
template <typename T>
__global__ void __launch_bounds__(kColThreads)
    _gumbel_softmax_fwd_col_kernel(const RawOf<T>* __restrict__ x, RawOf<T>* __restrict__ y, int64_t outer, int64_t K,
                                   int64_t inner, uint64_t seed, int64_t offset, float inv_tau, bool vec) {
  __shared__ SoftmaxStats red[kColPartials * 4];
  const int64_t ntiles = ((inner + 3) / 4 + blockDim.x - 1) / blockDim.x;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
      const ColQuad cq = col_quad(tile, inner);
      SoftmaxStats st[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) st[e] = softmax_stats_init();
      if (cq.nvalid > 0) {
#pragma unroll 2
        for (int64_t k = threadIdx.y; k < K; k += blockDim.y) {
          const int64_t rb = (o * K + k) * inner, f0 = rb + cq.i0;
          float v[4], g[4];
          load_quad<T>(x, f0, rb, rb + inner, vec, 0.f, v);
          gumbel_quad(seed, static_cast<uint64_t>(offset + f0), g);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (e < cq.nvalid) st[e] = softmax_stats_combine(st[e], softmax_stats_of((v[e] + g[e]) * inv_tau, 0.f));
        }
      }
      column_allreduce(st, red);
      float inv_s[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) inv_s[e] = 1.f / st[e].s;
      if (cq.nvalid > 0) {
#pragma unroll 2
        for (int64_t k = threadIdx.y; k < K; k += blockDim.y) {
          const int64_t rb = (o * K + k) * inner, f0 = rb + cq.i0;
          float v[4], g[4];
          load_quad<T>(x, f0, rb, rb + inner, vec, 0.f, v);
          gumbel_quad(seed, static_cast<uint64_t>(offset + f0), g);
#pragma unroll
          for (int e = 0; e < 4; ++e) v[e] = exp_below_max((v[e] + g[e]) * inv_tau, st[e].m) * inv_s[e];
          store_quad<T>(y, f0, rb, rb + inner, vec, v);
        }
      }
    }
  }
}

// Hard forward (WRITE_INDEX = false) and gumbel_argmax (true), column layout: one read pass with a
// running argmax per column, the column merge, then the one-hot over all k, or idx[o, i] (int64,
// [outer, inner] contiguous) written by the ty == 0 threads.
template <typename T, bool WRITE_INDEX>
__global__ void __launch_bounds__(kColThreads)
    _gumbel_argmax_col_kernel(const RawOf<T>* __restrict__ x, RawOf<T>* __restrict__ y, int64_t* __restrict__ idx,
                              int64_t outer, int64_t K, int64_t inner, uint64_t seed, int64_t offset, bool vec) {
  __shared__ ArgMaxState red[kColPartials * 4];
  const int64_t ntiles = ((inner + 3) / 4 + blockDim.x - 1) / blockDim.x;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
      const ColQuad cq = col_quad(tile, inner);
      ArgMaxState best[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) best[e] = argmax_init();
      if (cq.nvalid > 0) {
#pragma unroll 2
        for (int64_t k = threadIdx.y; k < K; k += blockDim.y) {
          const int64_t rb = (o * K + k) * inner, f0 = rb + cq.i0;
          float v[4], g[4];
          load_quad<T>(x, f0, rb, rb + inner, vec, 0.f, v);
          gumbel_quad(seed, static_cast<uint64_t>(offset + f0), g);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (e < cq.nvalid) best[e] = argmax_combine(best[e], ArgMaxState{v[e] + g[e], k});
        }
      }
      column_allreduce(best, red);
      if constexpr (WRITE_INDEX) {
        if (threadIdx.y == 0) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {  // static indices: best[] stays in registers
            if (e < cq.nvalid) {
              DF_DEVICE_CHECK(best[e].i >= 0 && best[e].i < K);
              idx[o * inner + cq.i0 + e] = best[e].i;
            }
          }
        }
      } else if (cq.nvalid > 0) {
        for (int64_t k = threadIdx.y; k < K; k += blockDim.y) {
          const int64_t rb = (o * K + k) * inner, f0 = rb + cq.i0;
          float v[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) v[e] = best[e].i == k ? 1.f : 0.f;
          store_quad<T>(y, f0, rb, rb + inner, vec, v);
        }
      }
    }
  }
}

// Backward, column layout: pass 1 per-column state (m, s, t = sum dy * exp(z - m)); column merge;
// pass 2 recomputes z, reloads dy and writes dx = inv_tau * y * (dy - T/S), y = exp(z - M) / S.
template <typename T, typename G>
__global__ void __launch_bounds__(kColThreads)
    _gumbel_softmax_bwd_col_kernel(const RawOf<G>* __restrict__ dy, const RawOf<T>* __restrict__ x,
                                   RawOf<T>* __restrict__ dx, int64_t outer, int64_t K, int64_t inner, uint64_t seed,
                                   int64_t offset, float inv_tau, bool vec, bool vec_dy) {
  __shared__ SoftmaxStats red[kColPartials * 4];
  const int64_t ntiles = ((inner + 3) / 4 + blockDim.x - 1) / blockDim.x;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
      const ColQuad cq = col_quad(tile, inner);
      SoftmaxStats st[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) st[e] = softmax_stats_init();
      if (cq.nvalid > 0) {
        for (int64_t k = threadIdx.y; k < K; k += blockDim.y) {
          const int64_t rb = (o * K + k) * inner, f0 = rb + cq.i0;
          float v[4], w[4], g[4];
          load_quad<T>(x, f0, rb, rb + inner, vec, 0.f, v);
          load_quad<G>(dy, f0, rb, rb + inner, vec_dy, 0.f, w);
          gumbel_quad(seed, static_cast<uint64_t>(offset + f0), g);
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (e < cq.nvalid) st[e] = softmax_stats_combine(st[e], softmax_stats_of((v[e] + g[e]) * inv_tau, w[e]));
        }
      }
      column_allreduce(st, red);
      float inv_s[4], dot[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        inv_s[e] = 1.f / st[e].s;
        dot[e] = st[e].t * inv_s[e];
      }
      if (cq.nvalid > 0) {
        for (int64_t k = threadIdx.y; k < K; k += blockDim.y) {
          const int64_t rb = (o * K + k) * inner, f0 = rb + cq.i0;
          float v[4], w[4], g[4];
          load_quad<T>(x, f0, rb, rb + inner, vec, 0.f, v);
          load_quad<G>(dy, f0, rb, rb + inner, vec_dy, 0.f, w);
          gumbel_quad(seed, static_cast<uint64_t>(offset + f0), g);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float yk = exp_below_max((v[e] + g[e]) * inv_tau, st[e].m) * inv_s[e];
            v[e] = inv_tau * yk * (w[e] - dot[e]);
          }
          store_quad<T>(dx, f0, rb, rb + inner, vec, v);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

constexpr int64_t kRowCacheBytes = 96 * 1024;  // dynamic smem a row kernel may use as its cache
constexpr int kRowMaxThreads = 512;           // matches the row kernels' __launch_bounds__
constexpr int64_t kMaxGridX = 1 << 30;
constexpr int64_t kMaxGridY = 65535;

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

bool aligned_for_quads(const void* p, at::ScalarType st) {
  const uintptr_t bytes = 4 * c10::elementSize(st);
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

void check_cuda(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda(), op, ": ", arg, ": expected a CUDA tensor, got a tensor on ", t.device());
}

struct RowConfig {
  int threads;
  bool cached;
  int64_t cache_quads;
  size_t smem;
};

// floats_per_elem: scores cached per element (1 forward, 2 backward, 0 argmax).
RowConfig row_config(int64_t K, int64_t offset, int floats_per_elem) {
  // Quads a row can span: K/4 when every row starts on a multiple of 4, else at most (K+3)/4 + 1.
  const int64_t nq_max = (offset % 4 == 0 && K % 4 == 0) ? K / 4 : (K + 3) / 4 + 1;
  const int threads = static_cast<int>(std::min<int64_t>(kRowMaxThreads, std::max<int64_t>(32, pow2_ceil((nq_max + 3) / 4))));
  const int64_t bytes = nq_max * 16 * floats_per_elem;
  const bool cached = floats_per_elem > 0 && bytes <= kRowCacheBytes;
  return RowConfig{threads, cached, cached ? nq_max : 0, cached ? static_cast<size_t>(bytes) : 0};
}

// Opts the kernel in to the whole row cache whenever it uses dynamic smem at all: the 48 KiB default
// covers static plus dynamic smem (the row kernels have ~384 B static), so opting in only above 48 KiB
// of dynamic smem fails launches just under it; and one constant value, never a per-call size, so that
// concurrent host threads cannot lower each other's limit.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 0)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kRowCacheBytes)));
}

struct ColConfig {
  dim3 block, grid;
};

// TY along K (up to 128), TX along column quads (up to 512/TY), at least one warp.
ColConfig col_config(int64_t outer, int64_t K, int64_t inner) {
  const int64_t iq = (inner + 3) / 4;
  int64_t TY = std::min<int64_t>(pow2_ceil(K), 128);
  const int64_t TX = std::min<int64_t>(pow2_ceil(iq), kColThreads / TY);
  if (TX * TY < 32) TY = 32 / TX;
  const int64_t tiles = (iq + TX - 1) / TX;
  return ColConfig{dim3(static_cast<unsigned>(TX), static_cast<unsigned>(TY)),
                   dim3(static_cast<unsigned>(std::min(tiles, kMaxGridX)), static_cast<unsigned>(std::min(outer, kMaxGridY)))};
}

// Dispatches on the logits dtype: float32, float16, bfloat16 only. check_float_dtype rejects the rest (fp64
// included) with a clear message first; a plain AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate
// every kernel for double, which has no Elem<> and no use here.
#define DF_DISPATCH(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

at::Tensor gumbel_noise_cuda(const at::Tensor& like, at::IntArrayRef shape, int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_noise";
  check_cuda(like, op, "like");
  check_float_dtype(like, op, "like");
  for (const int64_t s : shape) TORCH_CHECK(s >= 0, op, ": shape: expected sizes >= 0, got ", shape);
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(shape, like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = out.numel();
  check_offset(offset, numel, op);
  if (numel == 0) return out;
  const int64_t nq = ((offset + numel - 1) >> 2) - (offset >> 2) + 1;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((nq + threads - 1) / threads, 132 * 64);  // grid-stride beyond
  const bool vec = offset % 4 == 0 && aligned_for_quads(out.data_ptr(), out.scalar_type());
  auto stream = c10::cuda::getCurrentCUDAStream();
  DF_DISPATCH(out.scalar_type(), op, [&] {
    _gumbel_noise_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        reinterpret_cast<RawOf<scalar_t>*>(out.data_ptr()), numel, static_cast<uint64_t>(seed), offset, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The argmax of (x + g) along dim: into `y` as a one-hot (hard forward) or into `idx` (gumbel_argmax).
void launch_argmax(const at::Tensor& x, const ReductionView& s, int64_t seed, int64_t offset, at::Tensor* y, at::Tensor* idx) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool x_al = aligned_for_quads(x.data_ptr(), x.scalar_type());
  const bool y_al = y == nullptr || aligned_for_quads(y->data_ptr(), y->scalar_type());
  DF_DISPATCH(x.scalar_type(), "gumbel_argmax", [&] {
    using Raw = RawOf<scalar_t>;
    const Raw* xp = reinterpret_cast<const Raw*>(x.data_ptr());
    Raw* yp = y ? reinterpret_cast<Raw*>(y->data_ptr()) : nullptr;
    int64_t* ip = idx ? idx->data_ptr<int64_t>() : nullptr;
    if (s.inner == 1) {
      const RowConfig rc = row_config(s.K, offset, 0);
      const unsigned grid = static_cast<unsigned>(std::min(s.outer, kMaxGridX));
      const bool vec = offset % 4 == 0 && x_al && y_al;
      if (idx) {
        _gumbel_argmax_row_kernel<scalar_t, true><<<grid, rc.threads, 0, stream>>>(xp, yp, ip, s.outer, s.K,
                                                                                  static_cast<uint64_t>(seed), offset, vec);
      } else {
        _gumbel_argmax_row_kernel<scalar_t, false><<<grid, rc.threads, 0, stream>>>(xp, yp, ip, s.outer, s.K,
                                                                                   static_cast<uint64_t>(seed), offset, vec);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const ColConfig cc = col_config(s.outer, s.K, s.inner);
      const bool vec = s.inner % 4 == 0 && x_al && y_al;
      if (idx) {
        _gumbel_argmax_col_kernel<scalar_t, true><<<cc.grid, cc.block, 0, stream>>>(
            xp, yp, ip, s.outer, s.K, s.inner, static_cast<uint64_t>(seed), offset, vec);
      } else {
        _gumbel_argmax_col_kernel<scalar_t, false><<<cc.grid, cc.block, 0, stream>>>(
            xp, yp, ip, s.outer, s.K, s.inner, static_cast<uint64_t>(seed), offset, vec);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor gumbel_softmax_fwd_cuda(const at::Tensor& logits, double tau, bool hard, int64_t dim, int64_t seed,
                                   int64_t offset) {
  constexpr const char* op = "gumbel_softmax_fwd";
  check_cuda(logits, op, "logits");
  check_logits(logits, dim, op);
  check_float_dtype(logits, op, "logits");
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor y = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const ReductionView s = reduction_view(x, dim);
  if (hard) {
    launch_argmax(x, s, seed, offset, &y, nullptr);
    return y;
  }
  const float inv_tau = static_cast<float>(1.0 / tau);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool al = aligned_for_quads(x.data_ptr(), x.scalar_type()) && aligned_for_quads(y.data_ptr(), y.scalar_type());
  DF_DISPATCH(x.scalar_type(), op, [&] {
    using Raw = RawOf<scalar_t>;
    const Raw* xp = reinterpret_cast<const Raw*>(x.data_ptr());
    Raw* yp = reinterpret_cast<Raw*>(y.data_ptr());
    if (s.inner == 1) {
      const RowConfig rc = row_config(s.K, offset, 1);
      auto kernel = _gumbel_softmax_fwd_row_kernel<scalar_t>;
      allow_smem(kernel, rc.smem);
      const unsigned grid = static_cast<unsigned>(std::min(s.outer, kMaxGridX));
      kernel<<<grid, rc.threads, rc.smem, stream>>>(xp, yp, s.outer, s.K, static_cast<uint64_t>(seed), offset, inv_tau,
                                                    rc.cached, rc.cache_quads, offset % 4 == 0 && al);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const ColConfig cc = col_config(s.outer, s.K, s.inner);
      _gumbel_softmax_fwd_col_kernel<scalar_t><<<cc.grid, cc.block, 0, stream>>>(
          xp, yp, s.outer, s.K, s.inner, static_cast<uint64_t>(seed), offset, inv_tau, s.inner % 4 == 0 && al);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

template <typename T, typename G>
void launch_bwd(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, const ReductionView& s, int64_t seed, int64_t offset,
                float inv_tau) {
  using RawT = RawOf<T>;
  using RawG = RawOf<G>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool al = aligned_for_quads(x.data_ptr(), x.scalar_type()) && aligned_for_quads(dx.data_ptr(), dx.scalar_type());
  const bool al_dy = aligned_for_quads(dy.data_ptr(), dy.scalar_type());
  const RawG* gp = reinterpret_cast<const RawG*>(dy.data_ptr());
  const RawT* xp = reinterpret_cast<const RawT*>(x.data_ptr());
  RawT* dxp = reinterpret_cast<RawT*>(dx.data_ptr());
  if (s.inner == 1) {
    const RowConfig rc = row_config(s.K, offset, 2);
    auto kernel = _gumbel_softmax_bwd_row_kernel<T, G>;
    allow_smem(kernel, rc.smem);
    const unsigned grid = static_cast<unsigned>(std::min(s.outer, kMaxGridX));
    kernel<<<grid, rc.threads, rc.smem, stream>>>(gp, xp, dxp, s.outer, s.K, static_cast<uint64_t>(seed), offset, inv_tau,
                                                  rc.cached, rc.cache_quads, offset % 4 == 0 && al, al_dy);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const ColConfig cc = col_config(s.outer, s.K, s.inner);
    _gumbel_softmax_bwd_col_kernel<T, G><<<cc.grid, cc.block, 0, stream>>>(
        gp, xp, dxp, s.outer, s.K, s.inner, static_cast<uint64_t>(seed), offset, inv_tau, s.inner % 4 == 0 && al,
        s.inner % 4 == 0 && al_dy);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor gumbel_softmax_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, double tau, int64_t dim,
                                   int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_softmax_bwd";
  check_cuda(logits, op, "logits");
  check_cuda(grad, op, "grad");
  TORCH_CHECK(grad.device() == logits.device(), op, ": grad: expected a tensor on ", logits.device(), " (the logits' device), got ",
              grad.device());
  check_logits(logits, dim, op);
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK(grad.is_floating_point(), op, ": grad: expected a floating-point tensor, got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == logits.sizes(), op, ": grad: expected shape ", logits.sizes(), " (the logits' shape), got ",
              grad.sizes());
  check_tau(tau, op);
  check_offset(offset, logits.numel(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  // grad in the logits' dtype is read as is; any other float dtype is read as fp32 (one conversion).
  const at::Tensor dy = grad.scalar_type() == x.scalar_type() ? grad.contiguous() : grad.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return dx;
  const ReductionView s = reduction_view(x, dim);
  const float inv_tau = static_cast<float>(1.0 / tau);
  DF_DISPATCH(x.scalar_type(), op, [&] {
    if (dy.scalar_type() == x.scalar_type()) {
      launch_bwd<scalar_t, scalar_t>(dy, x, dx, s, seed, offset, inv_tau);
    } else {
      if constexpr (!std::is_same_v<scalar_t, float>) {
        launch_bwd<scalar_t, float>(dy, x, dx, s, seed, offset, inv_tau);
      } else {
        TORCH_CHECK(false, op, ": internal: fp32 logits with a grad that is not fp32 after conversion");
      }
    }
  });
  return dx;
}

at::Tensor gumbel_argmax_cuda(const at::Tensor& logits, int64_t dim, int64_t seed, int64_t offset) {
  constexpr const char* op = "gumbel_argmax";
  check_cuda(logits, op, "logits");
  check_logits(logits, dim, op);
  check_float_dtype(logits, op, "logits");
  check_offset(offset, logits.numel(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor idx = argmax_output(logits, dim, op);
  if (idx.numel() == 0) return idx;
  const at::Tensor x = logits.contiguous();
  const ReductionView s = reduction_view(x, dim);
  launch_argmax(x, s, seed, offset, nullptr, &idx);
  return idx;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("gumbel_noise", &dalle_fast::gumbel_noise_cuda);
  m.impl("gumbel_softmax_fwd", &dalle_fast::gumbel_softmax_fwd_cuda);
  m.impl("gumbel_softmax_bwd", &dalle_fast::gumbel_softmax_bwd_cuda);
  m.impl("gumbel_argmax", &dalle_fast::gumbel_argmax_cuda);
}
