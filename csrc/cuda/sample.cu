// CUDA C++ backend of dalle_fast.ops.sample (schema in csrc/ops.cpp, semantics in dalle_fast/ops/sampling.py).
//
// One block of kThreads threads per row of the [R, V] view (grid-stride over rows); a thread owns the
// columns tid, tid + kThreads, ... and re-reads them from global memory (L1/L2) in every pass, which keeps
// the kernel simple and its shared memory tiny (one slot per warp). Per row:
//   (1) z = x / temperature, max and the NaN / +inf flag, block-reduced -> an invalid row writes -1;
//   (2) top-k: 32 block-wide counts of key >= candidate (the bit walk of dalle_fast/sample.h) -> Tk;
//   (3) top-p: S = block sum of exp(z - max) over key >= Tk, then 32 block-wide masked sums -> Tp;
//   (4) argmax of z + g over key >= T: per thread, then a block reduction in torch.argmax order.
// The per-element math (key, mass term, Philox, Gumbel map, argmax order) is the C++ CPU backend's, from
// dalle_fast/math.h and dalle_fast/sample.h. Block reductions: xor shuffles in each warp, then every thread
// adds the warp partials in the same order, so all threads agree bit for bit on every threshold decision.
// The noise takes one Philox call per element (gumbel_at): 4x the calls of the quad scheme of gumbel.cu,
// negligible next to the 64 reductions per row at the sampler's sizes (B rows of V = 8192).
// Debug builds (DALLE_FAST_DEBUG) check the launch shape inside the kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "dalle_fast/launch.h"
#include "dalle_fast/math.h"
#include "dalle_fast/sample.h"

namespace dalle_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 1 << 30;

// The block's total of v, identical in every thread (fixed order). `sh` holds kWarps values.
template <typename A>
__device__ A block_sum(A v, A* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // sh may still be read from the previous reduction
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  A s = sh[0];
  for (int w = 1; w < kWarps; ++w) s += sh[w];
  return s;
}

__device__ float block_max(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = sh[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, sh[w]);
  return m;
}

__device__ ArgMaxState block_argmax(ArgMaxState a, float* shv, int64_t* shi) {
  for (int o = 16; o > 0; o >>= 1) {
    ArgMaxState b{__shfl_xor_sync(0xffffffffu, a.v, o), __shfl_xor_sync(0xffffffffu, a.i, o)};
    a = argmax_combine(a, b);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    shv[threadIdx.x >> 5] = a.v;
    shi[threadIdx.x >> 5] = a.i;
  }
  __syncthreads();
  ArgMaxState r{shv[0], shi[0]};
  for (int w = 1; w < kWarps; ++w) r = argmax_combine(r, ArgMaxState{shv[w], shi[w]});
  return r;
}

template <typename T>
__device__ __forceinline__ float score(const T* xr, int64_t j, float temperature) {
  return static_cast<float>(xr[j]) / temperature;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    _sample_row_kernel(const T* __restrict__ x, int64_t* __restrict__ out, int64_t R, int64_t V, float temperature,
                       int64_t k, float top_p, uint64_t seed, uint64_t offset) {
#ifdef DALLE_FAST_DEBUG
  if (blockDim.x != kThreads) {
    printf("dalle_fast sample.cu: expected %d threads, got %d\n", kThreads, (int)blockDim.x);
    __trap();
  }
#endif
  __shared__ float shf[kWarps];
  __shared__ int64_t shi[kWarps];
  __shared__ int shb[kWarps];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const T* xr = x + r * V;
    float m = -INFINITY;
    int bad = 0;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float z = score(xr, j, temperature);
      bad |= (z != z) || z == INFINITY;
      m = fmaxf(m, z);
    }
    m = block_max(m, shf);
    bad = block_sum(bad, shb);
    if (bad || m == -INFINITY) {  // block-uniform: every thread leaves together
      if (threadIdx.x == 0) out[r] = -1;
      continue;
    }
    uint32_t thr = 0;
    if (k > 0) {
      for (int i = 0; i < 32; ++i) {
        const uint32_t c = sample_bit_candidate(thr, i);
        int64_t n = 0;
        for (int64_t j = threadIdx.x; j < V; j += kThreads) n += sample_key(score(xr, j, temperature)) >= c ? 1 : 0;
        if (block_sum(n, shi) >= k) thr = c;
      }
    }
    if (top_p < 1.f) {
      float s = 0.f;
      for (int64_t j = threadIdx.x; j < V; j += kThreads) {
        const float z = score(xr, j, temperature);
        s += sample_mass_term(z, m, sample_key(z), thr);
      }
      const float target = top_p * block_sum(s, shf);
      uint32_t tp = 0;
      for (int i = 0; i < 32; ++i) {
        const uint32_t c = sample_bit_candidate(tp, i);
        float mass = 0.f;
        for (int64_t j = threadIdx.x; j < V; j += kThreads) {
          const float z = score(xr, j, temperature);
          const uint32_t key = sample_key(z);
          mass += key >= c ? sample_mass_term(z, m, key, thr) : 0.f;
        }
        if (block_sum(mass, shf) >= target) tp = c;
      }
      thr = tp;
    }
    ArgMaxState best = argmax_init();
    const uint64_t first = offset + static_cast<uint64_t>(r * V);
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float z = score(xr, j, temperature);
      if (sample_key(z) < thr) continue;
      best = argmax_combine(best, ArgMaxState{z + gumbel_at(seed, first + static_cast<uint64_t>(j)), j});
    }
    best = block_argmax(best, shf, shi);
    if (threadIdx.x == 0) out[r] = best.i;
  }
}

at::Tensor sample_cuda(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, int64_t seed,
                       int64_t offset) {
  constexpr const char* op = "sample";
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": logits: expected float16, bfloat16 or float32, got ", st);
  TORCH_CHECK(logits.is_cuda(), op, ": logits: expected a CUDA tensor (the cuda backend), got device ",
              logits.device());
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op,
              ": logits: expected at least 1 dimension and a non-empty last dim, got shape ", logits.sizes());
  const int64_t V = logits.size(-1);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature: expected a finite value > 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0 && top_k <= V, op, ": top_k: expected 0 (none) or a value in [1, ", V, "], got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, op, ": top_p: expected a value in (0, 1], got ", top_p);
  check_offset(offset, logits.numel(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 1);
  at::Tensor out = at::empty(shape, logits.options().dtype(at::kLong).memory_format(at::MemoryFormat::Contiguous));
  const int64_t R = out.numel();
  if (R == 0) return out;
  const at::Tensor x = logits.reshape({R, V}).contiguous();
  const int64_t k = top_k < V ? top_k : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(std::min(R, kMaxGrid));
  AT_DISPATCH_SWITCH(st, op, AT_DISPATCH_CASE(at::kFloat, [&] {
                       _sample_row_kernel<float><<<grid, kThreads, 0, stream>>>(
                           x.data_ptr<float>(), out.data_ptr<int64_t>(), R, V, static_cast<float>(temperature), k,
                           static_cast<float>(top_p), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       _sample_row_kernel<at::Half><<<grid, kThreads, 0, stream>>>(
                           x.data_ptr<at::Half>(), out.data_ptr<int64_t>(), R, V, static_cast<float>(temperature), k,
                           static_cast<float>(top_p), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       _sample_row_kernel<at::BFloat16><<<grid, kThreads, 0, stream>>>(
                           x.data_ptr<at::BFloat16>(), out.data_ptr<int64_t>(), R, V, static_cast<float>(temperature),
                           k, static_cast<float>(top_p), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) { m.impl("sample", &dalle_fast::sample_cuda); }
