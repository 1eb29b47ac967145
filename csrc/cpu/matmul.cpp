// C++ CPU backend of the scaled matmul family: scaled_matmul and scale_filter (schemas in csrc/ops.cpp,
// semantics in dalle_fast/reference/matmul.py, per-element math in dalle_fast/epilogue.h shared with CUDA).
//
// scaled_matmul = an optimised GEMM (at::mm: MKL / oneDNN, multithreaded) over the whole problem, then ONE
// fused epilogue pass (scale, bias, rounding to the output dtype, non-finite filter and flag), in place when
// the GEMM's result already has the output dtype. Per operand dtype:
//   fp32  sgemm straight into `out`; the epilogue rewrites it in place: no memory beyond the output. With
//         s == 1 and no filter the bias rides in the GEMM (addmm) and there is no epilogue pass at all.
//   bf16  oneDNN's bf16 GEMM (fp32 accumulation inside, one rounding to bf16) straight into `out`, epilogue in
//         place. The accumulator reaches the epilogue rounded to bf16 (CPU only; bf16 has fp32's range, so
//         nothing overflows before s < 1 unscales it; the double rounding is within bf16's tolerance). torch's
//         CPU GEMM offers no bf16 -> fp32 output, and widening to sgemm was 3-5x slower than oneDNN bf16.
//   fp16  torch's fp16 GEMM on CPU is a slow reference loop (2048x1024x4096: ~40 s on 2 cores, against ~0.1 s
//         for sgemm), so both operands are widened to fp32 (products of fp16 values are exact in fp32: this is
//         exactly fp32 accumulation) and sgemm writes an fp32 accumulator that the epilogue rounds to fp16.
// Panels of rows (GEMM then epilogue while the panel is in cache) were tried and dropped: every panel's GEMM
// call re-packs b, which cost more (2048x1024x4096 fp32: 0.77 s against 0.42 s) than the cache saved.
// The epilogue is a loop over independent elements, compiled for AVX-512, AVX2 and baseline by
// target_clones like the Gumbel kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

#include "common.h"
#include "dalle_fast/epilogue.h"
#include "dalle_fast/launch.h"

namespace dalle_fast {
namespace {

// One row of the epilogue: y[j] = round_T(s * acc[j] + bias[j]), filtered. acc and y may be the same memory
// (the in-place epilogue): element j is read before it is written and no other element is touched, so they
// are deliberately not __restrict. Returns whether any element was not finite in T.
template <typename T, typename A, typename B, bool kFilter>
DF_CLONES bool epilogue_row(const A* acc, const B* __restrict bias, float s, int64_t n, T* y) {
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    const float v = epilogue_affine(to_f32(acc[j]), s, bias ? to_f32(bias[j]) : 0.0f);
    const T r = from_f32<T>(v);
    if constexpr (kFilter) {
      const float back = to_f32(r);
      const bool ok = finite_f32(back);
      bad |= !ok;
      y[j] = ok ? r : from_f32<T>(0.0f);
    } else {
      y[j] = r;
    }
  }
  return bad;
}

// y[i] = round_T(x[i] * s) or round_T(x[i] / s), filtered.
template <typename X, typename T, bool kInvert, bool kFilter>
DF_CLONES bool scale_run(const X* __restrict x, float s, int64_t n, T* __restrict y) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const float xf = to_f32(x[i]);
    const float v = kInvert ? xf / s : xf * s;
    const T r = from_f32<T>(v);
    if constexpr (kFilter) {
      const bool ok = finite_f32(to_f32(r));
      bad |= !ok;
      y[i] = ok ? r : from_f32<T>(0.0f);
    } else {
      y[i] = r;
    }
  }
  return bad;
}

// The effective scale alpha * scale, read on the CPU (free here: the tensor lives in host memory).
float read_scale(double alpha, const std::optional<at::Tensor>& scale, const char* op) {
  if (!scale.has_value()) return static_cast<float>(alpha);
  const at::Tensor& sc = *scale;
  check_cpu(sc, op, "scale");
  TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == 1 && sc.dim() <= 1, op,
              ": scale: expected a 0-dim (or one-element) float32 tensor, got ", sc.scalar_type(), " of shape ",
              sc.sizes());
  return effective_scale(static_cast<float>(alpha), sc.data_ptr<float>()[0]);
}

std::tuple<at::Tensor, at::Tensor> scaled_matmul_cpu(const at::Tensor& a_in, const at::Tensor& b,
                                                     const std::optional<at::Tensor>& bias, double alpha,
                                                     const std::optional<at::Tensor>& scale, bool filter) {
  constexpr const char* op = "scaled_matmul";
  check_cpu(a_in, op, "a");
  check_cpu(b, op, "b");
  TORCH_CHECK(is_kernel_dtype(a_in.scalar_type()), op, ": a: expected float16, bfloat16 or float32, got ",
              a_in.scalar_type());
  TORCH_CHECK(is_kernel_dtype(b.scalar_type()), op, ": b: expected float16, bfloat16 or float32, got ",
              b.scalar_type());
  const bool mixed = a_in.scalar_type() == at::kFloat && b.scalar_type() != at::kFloat;
  TORCH_CHECK(mixed || a_in.scalar_type() == b.scalar_type(), op,
              ": b: expected the dtype of a (or float16/bfloat16 with a float32 a), got a ", a_in.scalar_type(),
              " and b ", b.scalar_type());
  TORCH_CHECK(a_in.dim() >= 2, op, ": a: expected [..., M, K] (at least 2 dims), got shape ", a_in.sizes());
  TORCH_CHECK(b.dim() == 2, op, ": b: expected [K, N], got shape ", b.sizes());
  const int64_t K = a_in.size(-1), N = b.size(1), M = a_in.size(-2);
  TORCH_CHECK(b.size(0) == K, op, ": b: expected ", K, " rows (a's last dim), got shape ", b.sizes());
  const at::ScalarType out_st = b.scalar_type();
  if (bias.has_value()) {
    check_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias: expected shape [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == out_st || bias->scalar_type() == at::kFloat, op, ": bias: expected ",
                out_st, " or float32, got ", bias->scalar_type());
  }
  float s = read_scale(alpha, scale, op);
  std::vector<int64_t> out_shape(a_in.sizes().begin(), a_in.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, a_in.options().dtype(out_st).memory_format(at::MemoryFormat::Contiguous));
  at::Tensor flag = at::zeros({1}, a_in.options().dtype(at::kInt));
  int64_t rows = M;  // every row of the batched a: prod(a.shape[:-1])
  for (int64_t d = 0; d + 2 < a_in.dim(); ++d) rows *= a_in.size(d);
  if (out.numel() == 0) return {out, flag};

  at::Tensor a = a_in;
  if (mixed) {  // s rides on a: a * s rounded to b's dtype, then the product in b's precision
    a = a_in.mul(s).to(out_st);
    s = 1.0f;
  }
  const at::Tensor a2 = a.reshape({rows, K});
  at::Tensor out2 = out.view({rows, N});
  // The GEMM: its result `acc` is `out` itself (fp32, bf16) or an fp32 accumulator (fp16).
  at::Tensor acc;
  if (out_st == at::kFloat && s == 1.0f && !filter && K > 0 &&
      (!bias.has_value() || bias->scalar_type() == at::kFloat)) {
    // Nothing for the epilogue to do but the bias: one GEMM call with the bias in it (addmm), no second pass
    // over the output. Small products, like a decoding step's, are mostly per-call cost.
    if (bias.has_value()) {
      at::addmm_out(out2, *bias, a2, b);
    } else {
      at::mm_out(out2, a2, b);
    }
    return {out, flag};
  }
  if (K == 0) {
    acc = at::zeros({rows, N}, a_in.options().dtype(at::kFloat));
  } else if (out_st == at::kHalf) {
    acc = at::mm(a2.to(at::kFloat), b.to(at::kFloat));
  } else {
    at::mm_out(out2, a2, b);
    acc = out2;
  }
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  std::atomic<bool> any_bad{false};
  dispatch_float(out_st, [&](auto tag) {
    using T = decltype(tag);
    T* y = out2.data_ptr<T>();
    auto run_rows = [&](auto atag, auto btag) {
      using A = decltype(atag);
      using B = decltype(btag);
      const A* accd = acc.data_ptr<A>();
      const B* bd = bias_c.defined() ? bias_c.data_ptr<B>() : nullptr;
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t i0, int64_t i1) {
        bool bad = false;
        for (int64_t i = i0; i < i1; ++i) {
          const A* ar = accd + i * N;
          T* yr = y + i * N;
          bad |= filter ? epilogue_row<T, A, B, true>(ar, bd, s, N, yr) : epilogue_row<T, A, B, false>(ar, bd, s, N, yr);
        }
        if (bad) any_bad.store(true, std::memory_order_relaxed);
      });
    };
    auto with_acc = [&](auto btag) {
      if (acc.scalar_type() == at::kFloat) {
        run_rows(float{}, btag);
      } else {
        run_rows(T{}, btag);
      }
    };
    if (!bias_c.defined() || bias_c.scalar_type() == at::kFloat) {
      with_acc(float{});
    } else {
      with_acc(T{});
    }
  });
  if (any_bad.load()) flag.fill_(1);
  return {out, flag};
}

std::tuple<at::Tensor, at::Tensor> scale_filter_cpu(const at::Tensor& x, double alpha,
                                                    const std::optional<at::Tensor>& scale, bool invert, bool filter,
                                                    at::ScalarType dtype) {
  constexpr const char* op = "scale_filter";
  check_cpu(x, op, "x");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": x: expected float16, bfloat16 or float32, got ",
              x.scalar_type());
  TORCH_CHECK(is_kernel_dtype(dtype), op, ": dtype: expected float16, bfloat16 or float32, got ", dtype);
  const float s = read_scale(alpha, scale, op);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  at::Tensor flag = at::zeros({1}, x.options().dtype(at::kInt));
  const int64_t n = x.numel();
  if (n == 0) return {out, flag};
  const at::Tensor xc = x.contiguous();
  std::atomic<bool> any_bad{false};
  dispatch_float(x.scalar_type(), [&](auto xtag) {
    using X = decltype(xtag);
    dispatch_float(dtype, [&](auto ttag) {
      using T = decltype(ttag);
      const X* xd = xc.data_ptr<X>();
      T* yd = out.data_ptr<T>();
      at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
        const int64_t len = i1 - i0;
        bool bad;
        if (invert) {
          bad = filter ? scale_run<X, T, true, true>(xd + i0, s, len, yd + i0)
                       : scale_run<X, T, true, false>(xd + i0, s, len, yd + i0);
        } else {
          bad = filter ? scale_run<X, T, false, true>(xd + i0, s, len, yd + i0)
                       : scale_run<X, T, false, false>(xd + i0, s, len, yd + i0);
        }
        if (bad) any_bad.store(true, std::memory_order_relaxed);
      });
    });
  });
  if (any_bad.load()) flag.fill_(1);
  return {out, flag};
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("scaled_matmul", &dalle_fast::scaled_matmul_cpu);
  m.impl("scale_filter", &dalle_fast::scale_filter_cpu);
}
