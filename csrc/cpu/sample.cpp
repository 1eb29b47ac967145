// C++ CPU backend of dalle_fast.ops.sample (schema in csrc/ops.cpp, semantics in dalle_fast/ops/sampling.py).
//
// One task of at::parallel_for samples whole rows of the [R, V] view. Per row (V contiguous elements, element
// numbers offset + r * V + j, one run of Philox blocks):
//   (1) z = x / temperature (fp32), its key (dalle_fast/sample.h), max, NaN / +inf flags;
//   (2) top-k: 32 counts of key >= candidate (the bit walk of sample.h) -> Tk;
//   (3) top-p: e = exp(z - max) on key >= Tk, S = sum e, then 32 masked sums -> Tp;
//   (4) the noise of the row (noise_runs.h), and argmax of z + g over key >= T (first index on ties).
// Invalid rows (NaN, +inf, all -inf) give -1; the Python wrapper raises on them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dalle_fast/launch.h"
#include "dalle_fast/math.h"
#include "dalle_fast/sample.h"
#include "noise_runs.h"

namespace dalle_fast {
namespace {

struct SampleScratch {
  std::vector<float> z, e;
  std::vector<uint32_t> key;
  RunNoise nz;
};

template <typename T>
DF_CLONES void load_scores(const T* __restrict x, int64_t V, float temperature, float* __restrict z,
                           uint32_t* __restrict key) {
  for (int64_t j = 0; j < V; ++j) {
    const float v = to_f32(x[j]) / temperature;
    z[j] = v;
    key[j] = sample_key(v);
  }
}

DF_CLONES int64_t count_at_least(const uint32_t* __restrict key, int64_t V, uint32_t c) {
  int64_t n = 0;
  for (int64_t j = 0; j < V; ++j) n += key[j] >= c ? 1 : 0;
  return n;
}

constexpr int kLanes = 16;

// The kept terms are selected by multiplying with 0 or 1 (exact: every e is finite and >= 0), not with
// `acc += key >= c ? e : 0.f`: GCC 12.2 at -O3 miscompiles that conditional accumulation in the x86-64-v3
// (AVX2) clone, returning sums short by up to half (found on an AVX2-only host by tests/test_sample.py; the
// baseline clone and -O2 were right).
DF_CLONES float mass_at_least(const uint32_t* __restrict key, const float* __restrict e, int64_t V, uint32_t c) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += e[j + l] * static_cast<float>(key[j + l] >= c);
  for (; j < V; ++j) acc[0] += e[j] * static_cast<float>(key[j] >= c);
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

DF_CLONES void mass_terms(const float* __restrict z, const uint32_t* __restrict key, int64_t V, float m, uint32_t Tk,
                          float* __restrict e) {
  for (int64_t j = 0; j < V; ++j) e[j] = sample_mass_term(z[j], m, key[j], Tk);
}

template <typename T>
int64_t sample_row(SampleScratch& sc, const T* x, int64_t V, float temperature, int64_t k, float top_p, uint64_t seed,
                   uint64_t first) {
  float* z = sc.z.data();
  uint32_t* key = sc.key.data();
  load_scores<T>(x, V, temperature, z, key);
  float m = -INFINITY;
  bool bad = false;
  for (int64_t j = 0; j < V; ++j) {
    bad |= (z[j] != z[j]) || z[j] == INFINITY;
    m = std::max(m, z[j]);
  }
  if (bad || m == -INFINITY) return -1;
  uint32_t thr = 0;
  if (k > 0) {
    for (int i = 0; i < 32; ++i) {
      const uint32_t c = sample_bit_candidate(thr, i);
      if (count_at_least(key, V, c) >= k) thr = c;
    }
  }
  if (top_p < 1.f) {
    float* e = sc.e.data();
    mass_terms(z, key, V, m, thr, e);
    const float target = top_p * mass_at_least(key, e, V, 0u);
    uint32_t tp = 0;
    for (int i = 0; i < 32; ++i) {
      const uint32_t c = sample_bit_candidate(tp, i);
      if (mass_at_least(key, e, V, c) >= target) tp = c;
    }
    thr = tp;
  }
  sc.nz.compute(seed, first, 0, 1, V);
  const float* g = sc.nz.at(0);
  float best = -INFINITY;
  int64_t idx = -1;
  for (int64_t j = 0; j < V; ++j) {
    if (key[j] < thr) continue;
    const float v = z[j] + g[j];
    if (idx < 0 || v > best) {
      best = v;
      idx = j;
    }
  }
  return idx;
}

at::Tensor sample_cpu(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, int64_t seed,
                      int64_t offset) {
  constexpr const char* op = "sample";
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": logits: expected float16, bfloat16 or float32, got ", st);
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits: expected a CPU tensor (the C++ CPU backend), got device ",
              logits.device());
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op,
              ": logits: expected at least 1 dimension and a non-empty last dim, got shape ", logits.sizes());
  const int64_t V = logits.size(-1);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature: expected a finite value > 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0 && top_k <= V, op, ": top_k: expected 0 (none) or a value in [1, ", V, "], got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, op, ": top_p: expected a value in (0, 1], got ", top_p);
  check_offset(offset, logits.numel(), op);
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 1);
  at::Tensor out = at::empty(shape, logits.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  const int64_t R = out.numel();
  if (R == 0) return out;
  const at::Tensor x = logits.reshape({R, V}).contiguous();
  const int64_t k = top_k < V ? top_k : 0;
  const float t = static_cast<float>(temperature), p = static_cast<float>(top_p);
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / V);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      SampleScratch sc;
      sc.z.resize(V);
      sc.e.resize(V);
      sc.key.resize(V);
      for (int64_t r = begin; r < end; ++r)
        o[r] = sample_row<T>(sc, xp + r * V, V, t, k, p, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(offset) + static_cast<uint64_t>(r * V));
    });
  };
  if (st == at::kFloat) {
    run(float{});
  } else if (st == at::kHalf) {
    run(c10::Half{});
  } else {
    run(c10::BFloat16{});
  }
  return out;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) { m.impl("sample", &dalle_fast::sample_cpu); }
