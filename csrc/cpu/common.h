// What every C++ CPU source shares: the target_clones switch (each hot loop compiled for x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2 + FMA and baseline, picked at load time) and loads / stores in the tensor dtypes as plain
// arithmetic, so that the loops around them vectorise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dalle_fast/math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DF_CLONES
#endif

namespace dalle_fast {
namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return uint32_as_float(static_cast<uint32_t>(v.x) << 16); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);
}

// Eight floats as one value (GCC vector extension). Inlined into a DF_CLONES loop, the arithmetic compiles
// for that clone's ISA (one AVX2 register, two SSE ones); accumulators of this type stay in registers.
// Unaligned loads and stores via memcpy. Every function taking or returning these types is DF_VEC: always
// inlined. An out-of-line copy is compiled for the baseline ISA, which passes a 32-byte vector in memory,
// while an AVX2 caller expects it in a register (GCC's -Wpsabi warning): garbage, not just slowness.
#define DF_VEC inline __attribute__((always_inline))
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
DF_VEC v8f splat8(float a) { return v8f{} + a; }
DF_VEC v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DF_VEC void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
// Eight elements of a tensor dtype as fp32, and back (round to nearest even, as c10's conversions). fp16 goes
// through GCC's _Float16 vectors: one vcvtph2ps / vcvtps2ph in the clones whose ISA has F16C (x86-64-v3, v4),
// where c10::Half's own conversion is integer code one element at a time. bf16 is the high half of an fp32.
typedef _Float16 v8h __attribute__((vector_size(16)));
typedef uint16_t v8s __attribute__((vector_size(16)));
template <typename T>
DF_VEC v8f load8_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load8(p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    v8h h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, v8f);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    v8s b;
    std::memcpy(&b, p, sizeof b);
    return reinterpret_cast<v8f>(__builtin_convertvector(b, v8u) << 16);
  }
}
template <typename T>
DF_VEC void store8_as(T* p, v8f v) {
  if constexpr (std::is_same_v<T, float>) {
    store8(p, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const v8h h = __builtin_convertvector(v, v8h);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int j = 0; j < 8; ++j) p[j] = from_f32<T>(v[j]);
  }
}

// math.h's exp_finite_or_zero on eight lanes, operation for operation. The scalar form's chain of selects
// (NaN, underflow, overflow) becomes branches that stop GCC's vectoriser: a loop calling it runs one
// element at a time (measured: ~10 ns per element in categorical_kl_uniform, against ~1 ns for torch's
// softmax). Vector selects are blends.
DF_VEC v8f exp8(v8f x) {
  const v8f lo = splat8(-86.f), hi = splat8(88.f), shift = splat8(12582912.f);
  v8f xc = x < lo ? lo : x;  // NaN passes through here...
  xc = xc > hi ? hi : xc;
  const v8f t = xc * 1.44269504089f + shift;
  const v8f nf = t - shift;
  const v8u n = reinterpret_cast<v8u>(t) - reinterpret_cast<v8u>(shift);
  const v8f r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  v8f p = splat8(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  v8f y = reinterpret_cast<v8f>(reinterpret_cast<v8u>(p) + (n << 23));
  y = x < lo ? splat8(0.f) : y;
  y = x > hi ? splat8(INFINITY) : y;
  return x != x ? x : y;  // ...and is restored here
}

typedef int32_t v8i __attribute__((vector_size(32)));

// math.h's log_positive_normal on eight lanes, operation for operation (positive, normal, finite x only).
DF_VEC v8f log8(v8f x) {
  const v8u ix = reinterpret_cast<v8u>(x);
  const v8i k = reinterpret_cast<v8i>(ix - 0x3f3504f3u) >> 23;  // 0x3f3504f3 = sqrt(1/2)
  const v8f m = reinterpret_cast<v8f>(ix - (reinterpret_cast<v8u>(k) << 23));
  const v8f f = m - 1.f;
  const v8f s = f / (2.f + f);
  const v8f s2 = s * s;
  const v8f R = s2 * (0.66666668653f + s2 * (0.40000000596f + s2 * (0.28571429849f + s2 * 0.22222198546f)));
  const v8f hfsq = 0.5f * f * f;
  const v8f kf = __builtin_convertvector(k, v8f);
  return kf * 6.9313812256e-01f - ((hfsq - (s * (hfsq + R) + kf * 9.0580006145e-06f)) - f);
}

}  // namespace
}  // namespace dalle_fast
