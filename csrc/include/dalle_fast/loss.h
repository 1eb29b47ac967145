// Per-element math of the loss head's fused row pass (ops.linear_cross_entropy), shared by csrc/cpu/loss.cpp
// and csrc/cuda/loss.cu (DESIGN section 2): no threads or memory layout here. The exps and logs are passed
// in already computed, so each backend picks its own (vectorisable on the CPU, expf / logf on the GPU) while
// the formulas stay written once.
//
// One row of a chunk: acc [V] the fp32 accumulator of x_i W^T, b the bias (0 when absent), t the target.
//   z_j = acc_j + b_j                  (the bias is added here: the logits GEMM has no epilogue of its own)
//   m = max_j z_j,  s = sum_j exp(z_j - m),  lse = m + log s
//   loss_i = lse - z_t
//   g_j = exp(z_j - lse) - [j == t]    (d loss_i / d z_j: softmax minus one-hot), written over acc
// A target outside [0, V) (the Python wrapper rejects it; under torch.compile it is not checked) gives a NaN
// loss and no one-hot: the kernels never index memory with it.
#pragma once

#include <cstdint>

#include "dalle_fast/math.h"

namespace dalle_fast {

DF_HD float ce_logit(float acc, float bias) { return acc + bias; }

// The shift of the exps: the row max, or 0 for a row of only -inf (whose exps are then all 0).
DF_HD float ce_shift(float m) { return m == -INFINITY ? 0.f : m; }

// lse from the shift m and log of s = sum exp(z - m).
DF_HD float ce_lse(float m, float log_s) { return ce_shift(m) + log_s; }

DF_HD bool ce_target_ok(int64_t t, int64_t V) { return t >= 0 && t < V; }

// loss_i = lse - z_t (NaN for a target out of range, whose z_t the caller passes as anything).
DF_HD float ce_loss(float lse, float z_t, bool target_ok) { return target_ok ? lse - z_t : NAN; }

// g_j from p_j = exp(z_j - lse).
DF_HD float ce_grad(float p, bool is_target) { return is_target ? p - 1.f : p; }

}  // namespace dalle_fast
