// C++ CPU backend of the loss head: dalle_fast::linear_cross_entropy (schema in csrc/ops.cpp, chunk loop in
// dalle_fast/loss_chunks.h, per-element math in dalle_fast/loss.h shared with csrc/cuda/loss.cu).
//
// The GEMMs run in fp32 (MKL / oneDNN sgemm): fp16 and bf16 operands are widened (x per chunk, the weight
// once), since torch's CPU fp16 GEMM is a slow reference loop (see csrc/cpu/matmul.cpp) and the products of
// fp16/bf16 values are exact in fp32. The fused row pass, one row per task of at::parallel_for, three sweeps
// over the row while it sits in L2 (a row of V = 16384 fp32 logits is 64 KiB):
//   1. z = acc + bias written back, and the max over 16 lanes (vectorised)
//   2. s = sum exp(z - m) over 16 lanes with the branch-free exp of dalle_fast/math.h (vectorised)
//   3. (only when gradients are asked) g = exp(z - lse) written over z, then g_t -= 1
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "common.h"
#include "dalle_fast/loss.h"
#include "dalle_fast/loss_chunks.h"

namespace dalle_fast {
namespace {

constexpr int kLanes = 16;

// Passes 1 and 2: z = acc + bias in place, returns lse.
DF_CLONES float row_lse(float* __restrict z, const float* __restrict bias, int64_t V) {
  float m[kLanes], s[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    m[j] = -INFINITY;
    s[j] = 0.f;
  }
  const int64_t vmain = V / kLanes * kLanes;
  for (int64_t k = 0; k < vmain; k += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = ce_logit(z[k + j], bias ? bias[k + j] : 0.f);
      z[k + j] = v;
      m[j] = (v > m[j] || v != v) ? v : m[j];
    }
  for (int64_t k = vmain; k < V; ++k) {
    const float v = ce_logit(z[k], bias ? bias[k] : 0.f);
    z[k] = v;
    m[0] = (v > m[0] || v != v) ? v : m[0];
  }
  float mx = m[0];
  for (int j = 1; j < kLanes; ++j) mx = (m[j] > mx || m[j] != m[j]) ? m[j] : mx;
  const float shift = ce_shift(mx);
  {  // the lanes as eight-lane vectors (exp8; the scalar exp does not vectorise)
    const v8f sh = splat8(shift);
    v8f acc[kLanes / 8] = {};
    for (int64_t k = 0; k < vmain; k += kLanes)
      for (int h = 0; h < kLanes / 8; ++h) acc[h] += exp8(load8(z + k + 8 * h) - sh);
    for (int h = 0; h < kLanes / 8; ++h) store8(s + 8 * h, load8(s + 8 * h) + acc[h]);
  }
  for (int64_t k = vmain; k < V; ++k) s[0] += exp_finite_or_zero(z[k] - shift);
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += s[j];
  return ce_lse(mx, std::log(sum));
}

// Pass 3: g = exp(z - lse) in place.
DF_CLONES void row_softmax(float* __restrict z, float lse, int64_t V) {
  const int64_t vv = V / 8 * 8;
  const v8f l = splat8(lse);
  for (int64_t k = 0; k < vv; k += 8) store8(z + k, exp8(load8(z + k) - l));
  for (int64_t k = vv; k < V; ++k) z[k] = exp_finite_or_zero(z[k] - lse);
}

void row_pass_cpu(at::Tensor& acc, const at::Tensor& bias32, const at::Tensor& target, at::Tensor loss,
                  at::Tensor& g, bool write_grad) {
  const int64_t c = acc.size(0), V = acc.size(1);
  float* a = acc.data_ptr<float>();
  const float* b = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const int64_t* t = target.data_ptr<int64_t>();
  float* l = loss.data_ptr<float>();
  TORCH_INTERNAL_ASSERT(!write_grad || g.data_ptr() == acc.data_ptr(), "the CPU row pass writes G in place");
  at::parallel_for(0, c, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* z = a + i * V;
      const float lse = row_lse(z, b, V);
      const bool ok = ce_target_ok(t[i], V);
      l[i] = ce_loss(lse, ok ? z[t[i]] : 0.f, ok);
      if (!write_grad) continue;
      row_softmax(z, lse, V);
      if (ok) z[t[i]] = ce_grad(z[t[i]], true);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t chunk_size, bool grad_x, bool grad_weight, bool grad_bias) {
  constexpr const char* op = "linear_cross_entropy";
  TORCH_CHECK(x.device().is_cpu(), op, ": x: expected a CPU tensor (the C++ CPU backend), got device ", x.device());
  check_linear_ce_args(x, weight, bias, target, chunk_size, op);
  return linear_ce_chunks(x, weight, bias, target, chunk_size, grad_x, grad_weight, grad_bias, at::kFloat,
                          row_pass_cpu);
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) { m.impl("linear_cross_entropy", &dalle_fast::linear_cross_entropy_cpu); }
