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

typedef int32_t v8i __attribute__((vector_size(32)));

// math.h's lanes for its exp and log templates: the very formulas of the scalar exp_finite_or_zero and
// log_positive_normal on eight lanes. Those two compile to branches that stop GCC's vectoriser, so a loop
// calling them runs one element at a time (measured: ~10 ns per element in categorical_kl_uniform, against
// ~1 ns for torch's softmax); vector selects are blends.
struct Lanes8 {
  using F = v8f;
  using U = v8u;
  using I = v8i;
  DF_VEC static U bits(F x) { return reinterpret_cast<U>(x); }
  DF_VEC static F from_bits(U u) { return reinterpret_cast<F>(u); }
  DF_VEC static I as_signed(U u) { return reinterpret_cast<I>(u); }
  DF_VEC static U as_unsigned(I i) { return reinterpret_cast<U>(i); }
  DF_VEC static F to_float(I i) { return __builtin_convertvector(i, F); }
};
DF_VEC v8f exp8(v8f x) { return exp_finite_or_zero_lanes<Lanes8>(x); }
DF_VEC v8f log8(v8f x) { return log_positive_normal_lanes<Lanes8>(x); }  // positive, normal, finite x only

}  // namespace
}  // namespace dalle_fast
