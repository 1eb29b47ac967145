// What every C++ CPU source shares: the target_clones switch (each hot loop compiled for x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2 + FMA and baseline, picked at load time) and loads / stores in the tensor dtypes as plain
// arithmetic, so that the loops around them vectorise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

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

}  // namespace
}  // namespace dalle_fast
