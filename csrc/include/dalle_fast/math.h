// Per-element math shared by the C++ CPU and the CUDA sources (DESIGN section 2).
//
// Everything here is a __host__ __device__ inline function without any thread, warp or memory
// layout knowledge, so the CPU tests exercise the very code the GPU runs. Keep it that way: the
// CUDA sources add only the mapping of work onto threads.
//
// The random stream (DESIGN section 3): element number n = offset + i (i = row-major index in the
// tensor's logical shape) takes output lane n % 4 of Philox4x32-10 keyed by the 64-bit seed
// (k0 = low word, k1 = high word) at the 64-bit counter n / 4 (c0 = low word, c1 = high word,
// c2 = c3 = 0). This is exactly triton.language.randint4x(seed, n // 4)[n % 4].
//
// uint32 -> uniform (triton.language.uint_to_uniform_float): reinterpret as int32, map negative x
// to ~x, multiply by 4.6566127342e-10f in fp32. The result lies in [0, 1 - 2^-24].
//
// uniform -> Gumbel, with the guard that keeps the result finite whatever the log's accuracy:
//     t = max(-log(max(u, 2^-32)), 2^-24);   g = -log(t)
// The inner max only changes u == 0 (every other u is >= 2^-31); the outer max only changes results
// where an approximate log rounds -log(u) below 2^-24 for u near 1. So g lies in
// [-log(22.18...), -log(2^-24)] = [-3.0993, 16.6355]: never infinite, never NaN.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace dalle_fast {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUintToUniformScale = 4.6566127342e-10f;
constexpr float kGumbelUMin = 2.3283064365386963e-10f;   // 2^-32
constexpr float kGumbelTMin = 5.9604644775390625e-08f;   // 2^-24

struct Philox4 {
  uint32_t x[4];
};

DF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1).
DF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(kPhiloxRoundB, p2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, p0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * p2;
    c3 = kPhiloxRoundA * p0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four outputs of the Philox block that holds element numbers 4c .. 4c+3.
DF_HD Philox4 philox_block(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The uint32 of element number n (one Philox call per element: for tests and ragged edges only).
DF_HD uint32_t philox_uint32_at(uint64_t seed, uint64_t n) {
  return philox_block(seed, n >> 2).x[n & 3];
}

DF_HD float uniform_from_uint32(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUintToUniformScale;
}

DF_HD float gumbel_from_uniform(float u) {
  // Full-precision logf on the device too: the largest noise values, which decide argmaxes, come
  // from u near 1, where an approximate log loses all relative accuracy of -log(u).
#if defined(__CUDA_ARCH__)
  const float t = fmaxf(-logf(fmaxf(u, kGumbelUMin)), kGumbelTMin);
  return -logf(t);
#else
  const float t = std::fmax(-std::log(std::fmax(u, kGumbelUMin)), kGumbelTMin);
  return -std::log(t);
#endif
}

DF_HD float gumbel_from_uint32(uint32_t bits) { return gumbel_from_uniform(uniform_from_uint32(bits)); }

DF_HD float gumbel_at(uint64_t seed, uint64_t n) { return gumbel_from_uint32(philox_uint32_at(seed, n)); }

DF_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// Online softmax state over a stream of scores z: m = max z, s = sum exp(z - m), and optionally
// t = sum w * exp(z - m) for a weight stream w (the backward's sum(dy * y) * s).
struct SoftmaxStats {
  float m;
  float s;
  float t;
};

DF_HD SoftmaxStats softmax_stats_init() { return SoftmaxStats{-INFINITY, 0.f, 0.f}; }

DF_HD void softmax_stats_push(SoftmaxStats& st, float z, float w) {
  if (z > st.m) {
    const float r = fast_exp(st.m - z);  // exp(-inf) = 0 on the first element
    st.s = st.s * r + 1.f;
    st.t = st.t * r + w;
    st.m = z;
  } else {
    const float e = fast_exp(z - st.m);
    st.s += e;
    st.t += w * e;
  }
}

DF_HD SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b) {
  if (b.m > a.m) {
    SoftmaxStats tmp = a;
    a = b;
    b = tmp;
  }
  if (b.m == -INFINITY) return a;
  const float r = fast_exp(b.m - a.m);
  return SoftmaxStats{a.m, a.s + b.s * r, a.t + b.t * r};
}

}  // namespace dalle_fast
