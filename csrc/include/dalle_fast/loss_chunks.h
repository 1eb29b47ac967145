// Host side of the loss head (ops.linear_cross_entropy), shared by the CPU and CUDA launchers (needs ATen;
// never included by device code). Per chunk of rows: the logits GEMM, ONE fused row pass (the backend's:
// bias, log-sum-exp, loss, softmax minus one-hot written over the logits, dalle_fast/loss.h), then the
// gradient GEMMs dx_c = G W, dW += G^T x_c and db += colsum G. The GEMMs are at::mm / at::addmm, the very GEMM
// the scaled_matmul kernels of csrc/cpu/matmul.cpp and csrc/cuda/matmul.cu are built on (MKL / oneDNN on the
// CPU, cuBLAS on the GPU), called directly: the row pass is this GEMM's epilogue, so scaled_matmul's own
// epilogue pass would only add a read and a write of the chunk.
//
// Memory: the op owns one [chunk, V] fp32 buffer (plus, when the GEMMs run in fp16/bf16, a [chunk, V] copy of
// G in that dtype), dW and db accumulate in fp32 ([V, d] and [V]); nothing of size [N, V] exists.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace dalle_fast {

inline void check_linear_ce_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& target, int64_t chunk_size, const char* op) {
  auto kernel_dtype = [](at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; };
  TORCH_CHECK(kernel_dtype(x.scalar_type()), op, ": x: expected float16, bfloat16 or float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x: expected a 2-D tensor [N, d], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight: expected [V, ", x.size(1),
              "] (V classes, d of x), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, op, ": weight: expected at least one class (row), got 0");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight: expected x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight: expected x's device ", x.device(), ", got ",
              weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias: expected shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias: expected x's dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias: expected x's device ", x.device(), ", got ",
                bias->device());
  }
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == x.size(0), op,
              ": target: expected an int64 tensor [", x.size(0), "], got ", target.scalar_type(), " of shape ",
              target.sizes());
  TORCH_CHECK(target.device() == x.device(), op, ": target: expected x's device ", x.device(), ", got ",
              target.device());
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size: expected >= 1, got ", chunk_size);
}

// acc = a @ b in fp32 (written into acc): fp32 operands directly; fp16/bf16 operands with fp32 accumulation
// and output (aten::mm.dtype_out, CUDA, torch >= 2.8).
inline void mm_f32_out(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(acc, a, b);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  at::mm_out(acc, a, b, at::kFloat);
#else
  at::mm_out(acc, a.to(at::kFloat), b.to(at::kFloat));
#endif
}

// acc += a @ b with fp32 acc (aten::addmm.dtype_out for fp16/bf16 operands).
inline void addmm_f32_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  at::addmm_out(acc, acc, a, b, at::kFloat);
#else
  acc.addmm_(a.to(at::kFloat), b.to(at::kFloat));
#endif
}

// The chunk loop. `gemm_dtype`: the dtype the GEMMs read their operands in (fp32, or x's fp16/bf16 on the
// GPU's tensor cores). `row_pass(acc, bias32, target_c, loss_c, g, write_grad)`: acc [c, V] fp32 contiguous
// (the logits GEMM's accumulator), bias32 [V] fp32 or undefined, target_c int64 [c] contiguous, loss_c fp32 [c]
// to write, g [c, V] to write G into (acc itself when gemm_dtype is fp32). Returns (loss fp32 0-dim, dx [N, d] in
// x's dtype, dW [V, d] in weight's dtype, db [V] in bias's dtype), the gradients empty ([0]) where not asked.
template <typename RowPass>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_chunks(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t chunk_size, bool need_x, bool need_w, bool need_b, at::ScalarType gemm_dtype, RowPass&& row_pass) {
  const int64_t N = x.size(0), V = weight.size(0);
  need_b = need_b && bias.has_value();
  const bool any_grad = need_x || need_w || need_b;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const at::Tensor w = weight.to(gemm_dtype);  // a copy only when the operands are widened (CPU fp16/bf16)
  const at::Tensor wt = w.t();
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor tgt = target.contiguous();
  at::Tensor loss_rows = at::empty({N}, f32);
  at::Tensor dx = need_x ? at::empty({N, x.size(1)}, x.options().memory_format(at::MemoryFormat::Contiguous))
                         : at::empty({0}, x.options());
  at::Tensor dw32 = need_w ? at::zeros({V, x.size(1)}, f32) : at::Tensor();
  at::Tensor db32 = need_b ? at::zeros({V}, f32) : at::Tensor();
  const int64_t rows = std::min(chunk_size, std::max<int64_t>(N, 1));
  at::Tensor acc_buf = at::empty({rows, V}, f32);
  at::Tensor g_buf = gemm_dtype == at::kFloat || !any_grad ? acc_buf : at::empty({rows, V}, x.options().dtype(gemm_dtype));
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t c = std::min(chunk_size, N - start);
    const at::Tensor xc = x.narrow(0, start, c).to(gemm_dtype);
    at::Tensor acc = acc_buf.narrow(0, 0, c);
    at::Tensor g = g_buf.narrow(0, 0, c);
    if (x.size(1) == 0) {
      acc.zero_();
    } else {
      mm_f32_out(acc, xc, wt);
    }
    row_pass(acc, bias32, tgt.narrow(0, start, c), loss_rows.narrow(0, start, c), g, any_grad);
    if (need_x) {
      at::Tensor dxc = dx.narrow(0, start, c);
      if (gemm_dtype == x.scalar_type()) {
        at::mm_out(dxc, g, w);  // fp32 accumulation inside the GEMM, rounded once to x's dtype
      } else {
        dxc.copy_(at::mm(g, w));
      }
    }
    if (need_w) addmm_f32_(dw32, g.t(), xc);
    if (need_b) db32.add_(g.sum(0, false, at::kFloat));
  }
  at::Tensor loss = loss_rows.sum();
  at::Tensor dw = need_w ? dw32.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor db = need_b ? db32.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {loss, dx, dw, db};
}

}  // namespace dalle_fast
