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
#elif defined(__GNUC__)
// Always inlined, as on the GPU: the CPU loops vectorise only with these functions inlined (gumbel_from_soa's
// `omp simd` loop calls log_positive_normal eight times), and GCC's inliner drops plain `inline` calls once a
// translation unit has grown past its budget (it did when dvae.cpp's softmax loops moved to exp8).
#define DF_HD inline __attribute__((always_inline))
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
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10  // unrolled, a loop over counters around this call vectorises (CPU backend)
#elif defined(__clang__)
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

// ---- Branch-free log and exp for loops that must vectorise on the CPU ----
// std::log / std::exp are library calls that keep a CPU loop scalar (about 20x slower than the SIMD
// code around them). These two are plain float/integer arithmetic with selects only, so a compiler
// vectorises a loop that calls them; the C++ CPU backend uses them for the noise map and the softmax.
// Accuracy (checked exhaustively over every input the noise map can see, and on the softmax range):
// within 2 ulp of the correctly rounded result, far inside the parity tolerances.

DF_HD uint32_t float_as_uint32(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

DF_HD float uint32_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The two functions below are written once, over "lanes" L: L = Lanes1 here (float, uint32_t, int32_t: the
// scalar code every backend runs) and, in csrc/cpu/common.h, eight-lane GCC vectors (exp8 and log8), whose
// selects are blends where the scalar ones compile to branches that stop GCC's vectoriser. L::F, L::U and L::I
// are the float, unsigned and signed types; bits / from_bits reinterpret, as_signed / as_unsigned convert
// integers bit for bit, to_float converts an integer to float.
struct Lanes1 {
  using F = float;
  using U = uint32_t;
  using I = int32_t;
  DF_HD static U bits(F x) { return float_as_uint32(x); }
  DF_HD static F from_bits(U u) { return uint32_as_float(u); }
  DF_HD static I as_signed(U u) { return static_cast<I>(u); }
  DF_HD static U as_unsigned(I i) { return static_cast<U>(i); }
  DF_HD static F to_float(I i) { return static_cast<F>(i); }
};

// log(x) for POSITIVE, NORMAL, FINITE x only (no 0, inf, NaN or subnormal handling: the noise map
// never produces them). fdlibm's reduction: x = 2^k * m with m in [sqrt(1/2), sqrt(2)), f = m - 1
// (exact), s = f / (2 + f), log(1 + f) = f - (f^2/2 - s * (f^2/2 + R(s^2))), so that the rounding of
// the small correction term is all the error; near x = 1 the relative accuracy of f is kept, which is
// what the Gumbel map needs for u close to 1.
template <typename L>
DF_HD typename L::F log_positive_normal_lanes(typename L::F x) {
  using F = typename L::F;
  const typename L::U ix = L::bits(x);
  const typename L::I k = L::as_signed(ix - 0x3f3504f3u) >> 23;  // 0x3f3504f3 = sqrt(1/2)
  const F m = L::from_bits(ix - (L::as_unsigned(k) << 23));
  const F f = m - 1.f;
  const F s = f / (2.f + f);
  const F s2 = s * s;
  // Taylor coefficients of 2 atanh(s)/s - 2 in s^2 (|s| <= 0.1716: the next term is below 2^-30).
  const F R = s2 * (0.66666668653f + s2 * (0.40000000596f + s2 * (0.28571429849f + s2 * 0.22222198546f)));
  const F hfsq = 0.5f * f * f;
  const F kf = L::to_float(k);
  // ln 2 split so that kf * kLn2Hi is exact for |k| < 2^8.
  return kf * 6.9313812256e-01f - ((hfsq - (s * (hfsq + R) + kf * 9.0580006145e-06f)) - f);
}
DF_HD float log_positive_normal(float x) { return log_positive_normal_lanes<Lanes1>(x); }

// exp(x) for any float x: exp(x) = 2^n * p(r), n = round(x / ln 2), |r| <= ln(2)/2, p a degree-7
// Taylor polynomial (truncation error below 2^-27). x below -86 returns 0 (exp(-86) ~ 4e-38: the
// softmax only uses exp(z - max), where such values do not matter), x above 88 returns +inf, NaN
// stays NaN.
template <typename L>
DF_HD typename L::F exp_finite_or_zero_lanes(typename L::F x) {
  using F = typename L::F;
  const F lo = F{} - 86.f, hi = F{} + 88.f, zero = F{}, inf = F{} + INFINITY;
  const F shift = F{} + 12582912.f;  // 1.5 * 2^23: rounds to an integer
  F xc = x < lo ? lo : x;            // NaN passes through here...
  xc = xc > hi ? hi : xc;
  const F t = xc * 1.44269504089f + shift;
  const F nf = t - shift;
  const typename L::U n = L::bits(t) - L::bits(shift);
  const F r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4
  F p = F{} + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  F y = L::from_bits(L::bits(p) + (n << 23));
  y = x < lo ? zero : y;
  y = x > hi ? inf : y;
  return x != x ? x : y;  // ...and is restored here
}
DF_HD float exp_finite_or_zero(float x) { return exp_finite_or_zero_lanes<Lanes1>(x); }

// max(a, b) for non-negative, non-NaN floats, as an integer max of the bit patterns (which order like
// the values). A float select in front of a log lets GCC thread the constant branch into control flow
// that stops the loop from vectorising; an integer max does not.
DF_HD float max_nonnegative(float a, float b) {
  const uint32_t x = float_as_uint32(a), y = float_as_uint32(b);
  return uint32_as_float(x > y ? x : y);
}

// uniform -> Gumbel, the one map of every C++ and CUDA kernel (DESIGN section 3):
//   t = max(-log(max(u, 2^-32)), 2^-24),  g = -log(t)
// with the branch-free log above, so the CPU loops vectorise and the GPU runs the very same arithmetic.
// u <= 1 - 2^-24 keeps -log(u) positive, which max_nonnegative needs.
DF_HD float gumbel_from_uniform(float u) {
  const float uc = max_nonnegative(u, kGumbelUMin);
  const float t = max_nonnegative(-log_positive_normal(uc), kGumbelTMin);
  return -log_positive_normal(t);
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

// ---- Reductions with exact NaN / -inf semantics (used by the CUDA kernels; usable on CPU too) ----
//
// These keep torch.softmax's semantics: -inf scores contribute 0, any NaN score makes the whole row NaN,
// a row of only -inf gives NaN. (A naive merge that skips a side whose max is -inf loses a NaN carried
// in its sum; a naive push computes exp(-inf - -inf) = NaN for a -inf score met while m is -inf.)

// exp(z - m) where m is the max of a set that contains z (NaNs ignored by that max), m == -inf
// allowed: then z is -inf (gives 0) or NaN (gives NaN).
DF_HD float exp_below_max(float z, float m) { return fast_exp(z - (m == -INFINITY ? 0.f : m)); }

// The state of a single score z with weight w: m = z, s = exp(z - z), t = w * s; merging it is a push.
// s is 1 for finite z, 0 for -inf, NaN for +inf and NaN (as torch.softmax, whose exp(z - max) is NaN
// at +inf). (z - z) + 1 gives exactly that without an exp.
DF_HD SoftmaxStats softmax_stats_of(float z, float w) {
  const float s = z == -INFINITY ? 0.f : (z - z) + 1.f;
  return SoftmaxStats{z, s, w * s};
}

// Merge of two states, exact for -inf (contributes 0) and NaN (propagates through s and t). The m of
// a state is never NaN (NaN never compares greater), so both operands order the same way, and the
// merge is commutative bit for bit (a + b == b + a, r == 1 exactly when the maxima are equal), so
// every lane of a butterfly reduction ends with the same value.
DF_HD SoftmaxStats softmax_stats_combine(SoftmaxStats a, SoftmaxStats b) {
  if (b.m > a.m) {
    const SoftmaxStats tmp = a;
    a = b;
    b = tmp;
  }
  // b.m == -inf: b holds only -inf scores (s == 0) and NaNs (s is NaN): scaling by 0 keeps the NaN
  // (NaN * 0 = NaN). With s == 0 there, the merge stays commutative when both maxima are -inf.
  const float r = b.m == -INFINITY ? 0.f : fast_exp(b.m - a.m);
  return SoftmaxStats{a.m, a.s + b.s * r, a.t + b.t * r};
}

// Running argmax with torch.argmax semantics: NaN is the maximum (the first NaN wins), otherwise the
// largest value, and the smallest index among equal values. The initial state (-inf, INT64_MAX) is an
// identity: every real element ties or beats it, and a tie goes to the smaller index.
struct ArgMaxState {
  float v;
  int64_t i;
};

DF_HD ArgMaxState argmax_init() { return ArgMaxState{-INFINITY, INT64_MAX}; }

// Whether (vb, ib) is preferred over (va, ia).
DF_HD bool argmax_prefers(float vb, int64_t ib, float va, int64_t ia) {
  const bool nb = vb != vb, na = va != va;
  if (na || nb) return (na && nb) ? ib < ia : nb;
  if (vb != va) return vb > va;
  return ib < ia;
}

DF_HD ArgMaxState argmax_combine(ArgMaxState a, ArgMaxState b) { return argmax_prefers(b.v, b.i, a.v, a.i) ? b : a; }

}  // namespace dalle_fast
