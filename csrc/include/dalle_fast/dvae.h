// Per-element math of the dVAE's fused ops (gumbel_quantize, logit_laplace_nll, categorical_kl_uniform),
// shared by csrc/cpu/dvae.cpp and csrc/cuda/dvae.cu (DESIGN section 2): no thread or memory layout here.
// The logs and exps are passed in already computed, so that each backend picks its own (vectorisable on
// the CPU, full-precision logf / expf on the GPU) while the formulas stay written once.
//
// gumbel_quantize. Per pixel p, scores z_k = (x_k + g_k) / tau over the K codes, lse = logsumexp_k z_k,
//   y_k = exp(z_k - lse),  out_c = sum_k W[c, k] y_k + b_c   (hard: y = one_hot(argmax_k (x_k + g_k)))
//   backward: G_k = sum_c W[c, k] dout_c,  t = sum_k y_k G_k,  dx_k = (1/tau) y_k (G_k - t),
//             dW[c, k] += dout_c y_k (hard: the one-hot),  db_c += dout_c.
// logit_laplace_nll (x in (0, 1), lb = ln b):
//   nll = |logit(x) - mu| e^-lb + lb + ln x + ln(1 - x) + ln 2
//   d/dmu = -sgn(d) e^-lb, d/dlb = 1 - |d| e^-lb, d/dx = sgn(d) e^-lb (1/x + 1/(1-x)) + 1/x - 1/(1-x),
//   d = logit(x) - mu, sgn(0) = 0 (torch's abs backward).
// categorical_kl_uniform over K codes of logits l: m = max l, s = sum e^(l - m), u = sum e^(l - m) (l - m)
//   lse = m + ln s, negent = sum q ln q = u / s - ln s, kl = negent + ln K
//   backward: dl_k = g q_k ((l_k - lse) - negent), q_k = e^(l_k - lse).
#pragma once

#include "dalle_fast/math.h"

namespace dalle_fast {

constexpr float kLn2 = 0.69314718055994531f;

// Reduction codes of the loss ops (torch's at::Reduction order).
enum LossReduction : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

// ---- logit_laplace_nll ----

// lx = ln x, l1x = ln(1 - x), ib = exp(-lb).
DF_HD float laplace_nll_value(float lx, float l1x, float mu, float lb, float ib) {
  const float d = (lx - l1x) - mu;
  return fabsf(d) * ib + lb + lx + l1x + kLn2;
}

DF_HD float sign_or_zero(float d) { return d > 0.f ? 1.f : (d < 0.f ? -1.f : d); }  // NaN stays NaN

// Gradients of g * nll with respect to x, mu and lb.
DF_HD void laplace_nll_grads(float x, float lx, float l1x, float mu, float ib, float g, float* dx, float* dmu,
                             float* dlb) {
  const float d = (lx - l1x) - mu;
  const float sg = sign_or_zero(d);
  const float inv_x = 1.f / x, inv_1mx = 1.f / (1.f - x);
  *dmu = -g * sg * ib;
  *dlb = g * (1.f - fabsf(d) * ib);
  *dx = g * (sg * ib * (inv_x + inv_1mx) + inv_x - inv_1mx);
}

// ---- categorical_kl_uniform ----

// Online update of (m, s, u) with one logit l: e^(l - m) and its weighted sum, rescaled when m grows.
// exp_fn is the backend's exp. The first finite logit resets from m = -inf.
struct KLStats {
  float m, s, u;
};

DF_HD KLStats kl_stats_init() { return KLStats{-INFINITY, 0.f, 0.f}; }

// Merge of two partial states (u is relative to each state's own m): exp(b.m - a.m) scales b.
DF_HD KLStats kl_stats_combine(KLStats a, KLStats b) {
  if (b.m > a.m) {
    const KLStats t = a;
    a = b;
    b = t;
  }
  if (b.m == -INFINITY) return KLStats{a.m, a.s + b.s, a.u + b.u};  // b is empty (s = u = 0)
  const float d = b.m - a.m;  // <= 0
  const float r = fast_exp(d);
  // b.u is relative to b.m: sum e (l - b.m) = sum e (l - a.m) - d sum e
  return KLStats{a.m, a.s + b.s * r, a.u + r * (b.u + d * b.s)};
}

// lse and negent (= sum q ln q) of a finished state.
DF_HD void kl_finish(KLStats st, float log_s, float* lse, float* negent) {
  *lse = st.m + log_s;
  *negent = st.u / st.s - log_s;
}

// F: float, or a vector of floats (the CPU loops' v8f).
template <typename F>
DF_HD F kl_grad(F l, F lse, F negent, F q, F g) {
  return g * q * ((l - lse) - negent);
}

}  // namespace dalle_fast
