// CPU-only noise pieces shared by the C++ CPU kernels that draw Gumbel noise (csrc/cpu/gumbel.cpp,
// csrc/cpu/dvae.cpp): Philox4x32-10 vectorised across blocks (AVX-512 / AVX2 intrinsics, the header's
// scalar function for the tail), and RunNoise, the noise of runs of consecutive element numbers with every
// Philox lane used (DESIGN section 3). The per-element math itself comes from dalle_fast/math.h.
//
// Everything is in an anonymous namespace: each including source gets its own copy (as target_clones needs).
#pragma once

#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"
#include "dalle_fast/math.h"

namespace dalle_fast {
namespace {

// ------------------------------------------------------------------------------------------------
// Noise

// Philox4x32-10 of the blocks at counters (lo[q], hi[q]), lanes stored structure-of-arrays:
// raw[lane * nq + q]. This is philox4x32_10 of math.h (the reference of every backend) mapped onto SIMD
// lanes by hand: each 32x32-bit multiply gives its high and low words from one pair of vpmuludq
// (even and odd lanes), where the auto-vectorised header loop needs 64-bit multiplies and widenings
// (about 3x the instructions). The scalar header function serves the tail and CPUs without AVX2;
// the CPU tests check these lanes against the header and the shared vectors.
#if defined(__x86_64__) && defined(__GNUC__)
#define DF_X86_SIMD 1

__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b);                        // a * b of lanes 0, 2, 4, ...
  const __m512i odd = _mm512_mul_epu32(a, _mm512_srli_epi64(b, 32));  // a * b of lanes 1, 3, 5, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) void philox_soa_avx512(uint32_t k0, uint32_t k1, const uint32_t* lo,
                                                           const uint32_t* hi, int64_t nq, int64_t q_begin,
                                                           int64_t q_end, uint32_t* raw) {
  const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int64_t q = q_begin; q + 16 <= q_end; q += 16) {
    __m512i c0 = _mm512_loadu_si512(lo + q), c1 = _mm512_loadu_si512(hi + q);
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t ka = k0, kb = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx512(rb, c2, hi_b, lo_b);
      mulhilo_avx512(ra, c0, hi_a, lo_a);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(static_cast<int>(ka)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(static_cast<int>(kb)));
      c1 = lo_b;
      c3 = lo_a;
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    _mm512_storeu_si512(raw + q, c0);
    _mm512_storeu_si512(raw + nq + q, c1);
    _mm512_storeu_si512(raw + 2 * nq + q, c2);
    _mm512_storeu_si512(raw + 3 * nq + q, c3);
  }
}

__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32));
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void philox_soa_avx2(uint32_t k0, uint32_t k1, const uint32_t* lo, const uint32_t* hi,
                                                      int64_t nq, int64_t q_begin, int64_t q_end, uint32_t* raw) {
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int64_t q = q_begin; q + 8 <= q_end; q += 8) {
    __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + q));
    __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + q));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t ka = k0, kb = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx2(rb, c2, hi_b, lo_b);
      mulhilo_avx2(ra, c0, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(ka)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(kb)));
      c1 = lo_b;
      c3 = lo_a;
      ka += kPhiloxKeyA;
      kb += kPhiloxKeyB;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + q), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + nq + q), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + 2 * nq + q), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + 3 * nq + q), c3);
  }
}

enum class PhiloxIsa { kScalar, kAvx2, kAvx512 };
PhiloxIsa detect_philox_isa() {
  __builtin_cpu_init();  // needed before __builtin_cpu_supports in a static initialiser
  return __builtin_cpu_supports("avx512f") ? PhiloxIsa::kAvx512
         : __builtin_cpu_supports("avx2")  ? PhiloxIsa::kAvx2
                                           : PhiloxIsa::kScalar;
}
const PhiloxIsa kPhiloxIsa = detect_philox_isa();
#endif

void philox_soa(uint32_t k0, uint32_t k1, const uint32_t* lo, const uint32_t* hi, int64_t nq, uint32_t* raw) {
  int64_t q = 0;
#if defined(DF_X86_SIMD)
  if (kPhiloxIsa == PhiloxIsa::kAvx512) {
    philox_soa_avx512(k0, k1, lo, hi, nq, 0, nq, raw);
    q = nq / 16 * 16;
  } else if (kPhiloxIsa == PhiloxIsa::kAvx2) {
    philox_soa_avx2(k0, k1, lo, hi, nq, 0, nq, raw);
    q = nq / 8 * 8;
  }
#endif
  for (; q < nq; ++q) {
    const Philox4 r = philox4x32_10(lo[q], hi[q], k0, k1);
    for (int l = 0; l < 4; ++l) raw[l * nq + q] = r.x[l];
  }
}

// out[4q + lane] = Gumbel noise of raw[lane * nq + q] (back to element order).
DF_CLONES void gumbel_from_soa(const uint32_t* __restrict raw, int64_t nq, float* __restrict out) {
#pragma omp simd
  for (int64_t q = 0; q < nq; ++q) {
    out[4 * q + 0] = gumbel_from_uint32(raw[q]);
    out[4 * q + 1] = gumbel_from_uint32(raw[nq + q]);
    out[4 * q + 2] = gumbel_from_uint32(raw[2 * nq + q]);
    out[4 * q + 3] = gumbel_from_uint32(raw[3 * nq + q]);
  }
}

// The noise of `nrun` runs of `len` consecutive element numbers, run r starting at first + r * stride.
// Every Philox block a run touches is computed once for that run and all its lanes that fall in the run
// are used, so only a block straddling two runs is computed twice (the ragged edges). After compute(),
// the noise of element number first + r * stride + j is at(r)[j].
struct RunNoise {
  std::vector<uint32_t> lo, hi, raw;
  std::vector<float> g;
  std::vector<int64_t> pos;

  void compute(uint64_t seed, uint64_t first, uint64_t stride, int64_t nrun, int64_t len) {
    pos.resize(nrun);
    int64_t nq = 0;
    for (int64_t r = 0; r < nrun; ++r) {
      const uint64_t a = first + static_cast<uint64_t>(r) * stride;
      nq += static_cast<int64_t>(((a + len - 1) >> 2) - (a >> 2)) + 1;
    }
    lo.resize(nq);
    hi.resize(nq);
    g.resize(4 * nq);
    int64_t q = 0;
    for (int64_t r = 0; r < nrun; ++r) {
      const uint64_t a = first + static_cast<uint64_t>(r) * stride;
      const uint64_t q0 = a >> 2, q1 = (a + len - 1) >> 2;
      pos[r] = 4 * q + static_cast<int64_t>(a & 3);
      for (uint64_t c = q0; c <= q1; ++c, ++q) {
        lo[q] = static_cast<uint32_t>(c);
        hi[q] = static_cast<uint32_t>(c >> 32);
      }
    }
    raw.resize(4 * nq);
    philox_soa(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), lo.data(), hi.data(), nq, raw.data());
    gumbel_from_soa(raw.data(), nq, g.data());
  }
  float* at(int64_t r) { return g.data() + pos[r]; }
  const float* at(int64_t r) const { return g.data() + pos[r]; }
};

}  // namespace
}  // namespace dalle_fast
