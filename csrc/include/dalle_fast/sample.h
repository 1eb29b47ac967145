// Per-element math of dalle_fast.ops.sample shared by the C++ CPU and CUDA kernels (csrc/cpu/sample.cpp,
// csrc/cuda/sample.cu); the Triton kernel (kernels/sample.py) writes the same lines.
//
// The thresholds of top-k and top-p are searched over an order-preserving uint32 key of the fp32 score z:
// z_a >= z_b  <=>  sample_key(z_a) >= sample_key(z_b) for non-NaN floats, +0 and -0 share a key (they
// compare equal), -inf has the smallest key of any non-NaN value (0x007FFFFF) and no float maps to 0,
// which the kernels use for padding. A threshold T is built bit by bit from bit 31 down:
//   T = 0; for b = 31..0: c = T | (1 << b); if pred(c): T = c
// which gives the largest T with pred(T) for any predicate that holds up to some T* and fails above it
// (count(key >= T) >= k, mass(key >= T) >= top_p * S): 32 reductions over the row, no sort.
#pragma once

#include <cstdint>

#include "dalle_fast/math.h"

namespace dalle_fast {

DF_HD uint32_t sample_key(float z) {
  const uint32_t bits = float_as_uint32(z);
  const uint32_t key = (bits >> 31) ? ~bits : (bits | 0x80000000u);
  return z == 0.f ? 0x80000000u : key;
}

// The candidate of step i (0..31) of the bit walk above.
DF_HD uint32_t sample_bit_candidate(uint32_t T, int i) { return T | (1u << (31 - i)); }

// exp(z - m) of the top-p mass: 0 for an entry outside the kept set (key < Tk) and for z = -inf.
DF_HD float sample_mass_term(float z, float m, uint32_t key, uint32_t Tk) {
  return key >= Tk ? exp_finite_or_zero(z - m) : 0.f;
}

}  // namespace dalle_fast
