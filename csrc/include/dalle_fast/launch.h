// Host-side helpers shared by the CPU and CUDA launchers (needs ATen; never included by device code).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace dalle_fast {

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 for the three float dtypes the kernels take. Callers
// check the dtype first (is_kernel_dtype, or a check that names the argument); anything else here is a bug.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "dalle_fast: unexpected dtype ", st);
  }
}

inline bool is_kernel_dtype(at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; }

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": ", arg, ": expected float16, bfloat16 or float32, got ",
              t.scalar_type());
}

// The C++ CPU backend's device check (the CUDA sources check their own device, which also names the GPU).
inline void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, ": expected a CPU tensor (the C++ CPU backend), got device ",
              t.device());
}

// A tensor seen as a contiguous [outer, K, inner] around its reduction dim (copied only when its layout
// is not contiguous). The kernels address element (o, k, i) at (o * K + k) * inner + i, which is also
// its logical row-major index: what the random stream counts.
struct ReductionView {
  at::Tensor t;  // 3-D, contiguous
  int64_t outer, K, inner;
};

inline ReductionView reduction_view(const at::Tensor& x, int64_t dim) {
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  const int64_t K = x.size(dim);
  return ReductionView{x.reshape({outer, K, inner}).contiguous(), outer, K, inner};
}

// The int64 output of gumbel_argmax: logits' shape without dim, contiguous. A non-empty output needs a
// non-empty dim (torch.argmax raises there too).
inline at::Tensor argmax_output(const at::Tensor& logits, int64_t dim, const char* op) {
  std::vector<int64_t> shape;
  for (int64_t d = 0; d < logits.dim(); ++d)
    if (d != dim) shape.push_back(logits.size(d));
  at::Tensor out = at::empty(shape, logits.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  TORCH_CHECK(out.numel() == 0 || logits.size(dim) > 0, op, ": logits: expected a non-empty dim ", dim,
              " (argmax of nothing), got shape ", logits.sizes());
  return out;
}

inline void check_logits(const at::Tensor& logits, int64_t dim, const char* op) {
  TORCH_CHECK(logits.is_floating_point(), op, ": logits: expected a floating-point tensor, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() >= 1, op, ": logits: expected at least 1 dimension, got a 0-dim tensor");
  TORCH_CHECK(dim >= 0 && dim < logits.dim(), op, ": dim: expected a value in [0, ", logits.dim(), "), got ", dim);
}

inline void check_offset(int64_t offset, int64_t numel, const char* op) {
  TORCH_CHECK(offset >= 0, op, ": offset: expected >= 0, got ", offset);
  TORCH_CHECK(offset <= INT64_MAX - numel, op, ": offset: offset + numel must stay below 2**63, got offset ", offset,
              " and numel ", numel);
}

inline void check_tau(double tau, const char* op) {
  TORCH_CHECK(tau > 0 && std::isfinite(tau), op, ": tau: expected a finite value > 0, got ", tau);
}

}  // namespace dalle_fast
