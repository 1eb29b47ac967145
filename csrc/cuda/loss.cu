// CUDA C++ backend of the loss head: dalle_fast::linear_cross_entropy (schema in csrc/ops.cpp, chunk loop in
// dalle_fast/loss_chunks.h shared with the CPU backend, per-element math in dalle_fast/loss.h, which
// csrc/cpu/loss.cpp runs in the CPU tests).
//
// GEMMs: cuBLAS through ATen (at::mm / at::addmm), the GEMM csrc/cuda/matmul.cu's scaled_matmul is built on.
// fp32 inputs: fp32 GEMMs (TF32 only when torch.backends.cuda.matmul.allow_tf32 is set, as torch's own), the
// row pass writes G over the fp32 logits. fp16 / bf16 inputs: the logits GEMM reads them on tensor cores with
// an fp32 output (aten::mm.dtype_out), the row pass writes G rounded to that dtype into a second [chunk, V]
// buffer, so both gradient GEMMs run on tensor cores too (dW accumulated in fp32 by aten::addmm.dtype_out).
//
// Row kernel: one block of kRowThreads threads per row (never runs where it was written: kept simple).
//   sweep 1: each thread keeps the online softmax state (m, s) of the elements j = tid (mod blockDim) of
//            z = acc + bias (softmax_stats_combine of dalle_fast/math.h), merged by warp shuffles, then
//            through shared memory across warps; lse = m + log s, loss = lse - z_t by thread 0
//   sweep 2: g_j = exp(z_j - lse) - [j == t] written (coalesced: consecutive threads, consecutive j).
// Debug builds (DALLE_FAST_DEBUG) check the launch shape in the kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <type_traits>

#include "dalle_fast/loss.h"
#include "dalle_fast/loss_chunks.h"
#include "dalle_fast/math.h"

#include "dalle_fast/device_check.h"

namespace dalle_fast {
namespace {

constexpr int kRowThreads = 512;
constexpr int kWarps = kRowThreads / 32;

__device__ __forceinline__ SoftmaxStats shfl_stats(SoftmaxStats st, int lane_mask) {
  SoftmaxStats o;
  o.m = __shfl_xor_sync(0xffffffffu, st.m, lane_mask);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, lane_mask);
  o.t = 0.f;
  return o;
}

template <typename G>
__global__ void __launch_bounds__(kRowThreads)
    ce_rows_kernel(const float* acc, const float* __restrict__ bias, const int64_t* __restrict__ target,
                   float* __restrict__ loss, G* g, int64_t V, bool write_grad) {  // g may be acc itself
  DF_DEVICE_CHECK(blockDim.x == kRowThreads);
  __shared__ float sm_m[kWarps], sm_s[kWarps];
  __shared__ float sh_lse;
  const int64_t row = blockIdx.x;
  const float* z = acc + row * V;
  SoftmaxStats st = softmax_stats_init();
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) {
    st = softmax_stats_combine(st, softmax_stats_of(ce_logit(z[j], bias ? bias[j] : 0.f), 0.f));
  }
  for (int off = 16; off > 0; off >>= 1) st = softmax_stats_combine(st, shfl_stats(st, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm_m[warp] = st.m;
    sm_s[warp] = st.s;
  }
  __syncthreads();
  const int64_t t = target[row];
  const bool ok = ce_target_ok(t, V);
  if (threadIdx.x == 0) {
    SoftmaxStats all = softmax_stats_init();
    for (int w = 0; w < kWarps; ++w) all = softmax_stats_combine(all, SoftmaxStats{sm_m[w], sm_s[w], 0.f});
    const float lse = ce_lse(all.m, logf(all.s));
    sh_lse = lse;
    loss[row] = ce_loss(lse, ok ? ce_logit(z[t], bias ? bias[t] : 0.f) : 0.f, ok);
  }
  if (!write_grad) return;
  __syncthreads();
  const float lse = sh_lse;
  G* gr = g + row * V;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) {
    const float p = expf(ce_logit(z[j], bias ? bias[j] : 0.f) - lse);
    gr[j] = static_cast<G>(ce_grad(p, j == t));
  }
}

void row_pass_cuda(at::Tensor& acc, const at::Tensor& bias32, const at::Tensor& target, at::Tensor loss,
                   at::Tensor& g, bool write_grad) {
  const int64_t c = acc.size(0), V = acc.size(1);
  if (c == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* bp = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  auto launch = [&](auto* gp) {
    using G = std::remove_pointer_t<decltype(gp)>;
    ce_rows_kernel<G><<<static_cast<unsigned>(c), kRowThreads, 0, stream>>>(
        acc.data_ptr<float>(), bp, target.data_ptr<int64_t>(), loss.data_ptr<float>(), gp, V, write_grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // G over the logits in place (fp32; each element is read then written by the same thread), or into the
  // separate low-precision buffer.
  switch (g.scalar_type()) {
    case at::kFloat:
      launch(g.data_ptr<float>());
      break;
    case at::kHalf:
      launch(g.data_ptr<at::Half>());
      break;
    case at::kBFloat16:
      launch(g.data_ptr<at::BFloat16>());
      break;
    default:
      TORCH_CHECK(false, "linear_cross_entropy: unexpected gradient dtype ", g.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t chunk_size, bool grad_x, bool grad_weight, bool grad_bias) {
  constexpr const char* op = "linear_cross_entropy";
  TORCH_CHECK(x.is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  check_linear_ce_args(x, weight, bias, target, chunk_size, op);
  return linear_ce_chunks(x, weight, bias, target, chunk_size, grad_x, grad_weight, grad_bias, x.scalar_type(),
                          row_pass_cuda);
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) { m.impl("linear_cross_entropy", &dalle_fast::linear_cross_entropy_cuda); }
