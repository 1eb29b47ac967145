// Per-element epilogue math of the scaled matmul family (DESIGN sections 2 and 6), shared by the C++ CPU
// and the CUDA sources: __host__ __device__ inline functions with no knowledge of threads or layouts, so the
// CPU tests exercise the very code the GPU runs.
//
//   scaled_matmul   y = s * acc + bias, acc the fp32 accumulator of a @ b, s = alpha * scale (fp32)
//   scale_filter    y = x * s, or x / s (invert), x read as fp32
// then, in both, the value is rounded to the output dtype and, with the filter on, an element that is not
// finite in the OUTPUT dtype (NaN, +-inf, or a finite fp32 value that overflows fp16 on rounding) is written
// as 0 and raises the non-finite flag. Checking after the rounding is what matters for fp16 training: a
// gradient that only overflows when stored in fp16 must be caught too.
#pragma once

#include <cstdint>

#include "dalle_fast/math.h"  // DF_HD, float_as_uint32

namespace dalle_fast {

// The effective scale s = alpha * scale, in fp32 as every backend computes it.
DF_HD float effective_scale(float alpha, float scale) { return alpha * scale; }

// y = s * acc + bias in fp32 (bias 0 when absent). The multiply and the add are two roundings, not an fma,
// on every backend (the Triton kernel and the eager reference do the same).
DF_HD float epilogue_affine(float acc, float s, float bias) {
  const float scaled = acc * s;
  return scaled + bias;
}

// Whether an fp32 value is finite: exponent bits not all ones.
DF_HD bool finite_f32(float v) { return (float_as_uint32(v) & 0x7f800000u) != 0x7f800000u; }

// The flagging filter: v (already rounded to the output dtype and read back as fp32) if finite, else 0;
// `bad` becomes true for a non-finite v.
DF_HD float filter_nonfinite(float v, bool& bad) {
  const bool ok = finite_f32(v);
  bad = bad || !ok;
  return ok ? v : 0.0f;
}

}  // namespace dalle_fast
