// CUDA C++ backend of sparse_decode_attention (schema in csrc/ops.cpp, semantics in dalle_fast/ops/decode.py).
// fp16, bf16 and fp32; head sizes D in {32, 64, 128}.
//
// Which keys: decode_key_range / decode_slot_count of dalle_fast/attention.h (shared with the C++ CPU backend,
// whose tests run that very code): the text prefix, then the kind's image ranges. The online-softmax rescale
// is attention.h's -inf-safe online_softmax_rescale / _shift. This file only maps the work onto threads.
//
// Mapping. One block of 128 threads per (query, b * h): grid (n, B * H). A group of G = D / 8 consecutive
// lanes (4, 8 or 16; inside one warp) takes one key at a time: each lane holds 8 consecutive dims of q, k and v
// (one 16-byte load for fp16 / bf16, two for fp32), the score is the group's partial dots summed with
// __shfl_xor_sync. The block's NG = 128 / G groups split the keys of every range between them (split-K inside
// the block: at the paper's layout the text prefix alone is 256 keys, 16 per group at D = 64): key j of a range
// goes to group j mod NG. Each group keeps its own online-softmax state (m, l, acc[8] per lane); at the end the
// groups' states are combined through shared memory (m = max m_g, l = sum l_g e^(m_g - m), acc likewise) and
// thread d < D writes out[b, t, h, d]. Loops are uniform per warp (keys past a range's end are masked, not
// skipped) so that the shuffles always see every lane.
//
// Position. p0 comes from pos_ptr (a 0-dim int64 on the device, so a CUDA graph replays the step with the
// position updated in place) when given, else from the scalar argument. A position with p0 < 0 or
// p0 + n > Lmax reads nothing and writes NaN (the host cannot check a device value without a sync); debug
// builds (DALLE_FAST_DEBUG) trap instead.
//
// Inputs: the 16-byte loads need stride(-1) == 1, the other strides multiples of 16 bytes and a 16-byte aligned
// data pointer; a tensor that misses any of these is copied to a contiguous one first (a [B, Lmax, H, D] cache
// viewed as [B, H, Lmax, D] is read in place).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "dalle_fast/attention.h"
#include "dalle_fast/decode_launch.h"

#include "dalle_fast/device_check.h"

namespace dalle_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // dims per lane

struct DecodeArgs {
  MaskSpec m;
  int H, n, lmax, slots;
  int64_t position;
  float scale;
  int64_t sq[3], sk[3], sv[3];  // strides of dims 0, 1, 2 (dim 3 has stride 1)
};

__device__ __forceinline__ void load8(const float* p, float (&f)[kVec]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ void load8(const __half* p, float (&f)[kVec]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x, f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&f)[kVec]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a 16-bit shift
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void store1(float* p, float x) { *p = x; }
__device__ __forceinline__ void store1(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    sparse_decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   T* __restrict__ out, const int64_t* __restrict__ pos_ptr, DecodeArgs a) {
  constexpr int G = D / kVec;       // lanes per key
  constexpr int NG = kThreads / G;  // groups per block
  constexpr int KPW = 32 / G;       // keys per warp per step
  static_assert(32 % G == 0, "a group lies inside one warp");
  __shared__ float s_m[NG], s_l[NG];
  __shared__ float s_acc[NG][D];

  const int t = blockIdx.x;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int tid = threadIdx.x, g = tid / G, lane = tid % G;
  const int warp = tid / 32, gw = (tid % 32) / G;  // group within the warp
  const int64_t p0 = pos_ptr != nullptr ? *pos_ptr : a.position;
  const bool in_range = p0 >= 0 && p0 + a.n <= a.lmax;
  DF_DEVICE_CHECK(in_range);
  const int p = static_cast<int>(p0) + t;

  float qf[kVec], acc[kVec];
  load8(q + b * a.sq[0] + h * a.sq[1] + t * a.sq[2] + lane * kVec, qf);
#pragma unroll
  for (int i = 0; i < kVec; ++i) qf[i] *= a.scale, acc[i] = 0.f;
  float mx = -INFINITY, l = 0.f;
  const T* kb = k + b * a.sk[0] + h * a.sk[1] + lane * kVec;
  const T* vb = v + b * a.sv[0] + h * a.sv[1] + lane * kVec;

  const int slots = in_range ? a.slots : 0;
  for (int slot = 0; slot < slots; ++slot) {
    const KeyRange r = decode_key_range(a.m, p, slot);
    // warp w takes keys w * KPW + j * (4 * KPW) ..., group gw of it one of them: uniform trip count per warp
    for (int j0 = warp * KPW; j0 < r.count; j0 += (kThreads / 32) * KPW) {
      const int j = j0 + gw;
      const bool ok = j < r.count;
      const int64_t key = static_cast<int64_t>(r.start) + static_cast<int64_t>(ok ? j : 0) * r.step;
      float kf[kVec], vf[kVec];
      load8(kb + key * a.sk[2], kf);
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) s = fmaf(qf[i], kf[i], s);
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      s = ok ? s : -INFINITY;
      const float m_new = fmaxf(mx, s);
      const float alpha = online_softmax_rescale(mx, m_new);
      const float pe = expf(s - online_softmax_shift(m_new));
      l = l * alpha + pe;
      load8(vb + key * a.sv[2], vf);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = fmaf(pe, vf[i], acc[i] * alpha);
      mx = m_new;
    }
  }

  if (lane == 0) s_m[g] = mx, s_l[g] = l;
#pragma unroll
  for (int i = 0; i < kVec; ++i) s_acc[g][lane * kVec + i] = acc[i];
  __syncthreads();
  if (tid < D) {
    float m_all = -INFINITY;
    for (int i = 0; i < NG; ++i) m_all = fmaxf(m_all, s_m[i]);
    float l_all = 0.f, o = 0.f;
    for (int i = 0; i < NG; ++i) {
      const float c = online_softmax_rescale(s_m[i], m_all);  // 0 for a group that saw no key
      l_all = fmaf(s_l[i], c, l_all);
      o = fmaf(s_acc[i][tid], c, o);
    }
    const float res = in_range ? o / l_all : NAN;
    store1(out + ((b * a.n + t) * a.H + h) * D + tid, res);
  }
}

template <typename T>
bool vec_ok(const at::Tensor& x) {
  constexpr int64_t per16 = 16 / sizeof(T);
  if (x.stride(3) != 1 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (x.size(d) > 1 && x.stride(d) % per16 != 0) return false;
  return true;
}

template <typename T, typename AT>
void launch(const DecodeProblem& p, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
            const std::optional<at::Tensor>& pt, int64_t position, at::Tensor& out) {
  const auto ready = [](const at::Tensor& x) { return vec_ok<AT>(x) ? x : x.contiguous(); };
  const at::Tensor q = ready(q_in), k = ready(k_in), v = ready(v_in);
  DecodeArgs a{};
  a.m = p.m;
  a.H = static_cast<int>(p.H), a.n = static_cast<int>(p.n), a.lmax = static_cast<int>(p.Lmax);
  a.slots = decode_slot_count(p.m);
  a.position = position;
  a.scale = p.scale;
  for (int d = 0; d < 3; ++d) a.sq[d] = q.stride(d), a.sk[d] = k.stride(d), a.sv[d] = v.stride(d);
  const int64_t* pos = pt.has_value() ? pt->data_ptr<int64_t>() : nullptr;
  const dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>(p.B * p.H));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  switch (p.D) {
    case 32:
      sparse_decode_attention_kernel<T, 32><<<grid, kThreads, 0, stream>>>(qp, kp, vp, op, pos, a);
      break;
    case 64:
      sparse_decode_attention_kernel<T, 64><<<grid, kThreads, 0, stream>>>(qp, kp, vp, op, pos, a);
      break;
    default:
      sparse_decode_attention_kernel<T, 128><<<grid, kThreads, 0, stream>>>(qp, kp, vp, op, pos, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sparse_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& position_tensor, int64_t position,
                                        int64_t kind, int64_t text_len, int64_t grid_h, int64_t grid_w,
                                        int64_t kernel, bool torus, double scale) {
  constexpr const char* op = "sparse_decode_attention";
  c10::cuda::CUDAGuard guard(q.device());
  const DecodeProblem p =
      decode_problem(q, k, v, kind, text_len, grid_h, grid_w, kernel, torus, scale, c10::DeviceType::CUDA, op);
  check_position_tensor(position_tensor, q, op);
  at::Tensor out = decode_out_bnhd(q);
  if (p.B * p.H * p.n == 0) return out.transpose(1, 2);
  if (!position_tensor.has_value()) check_position_value(position, p, op);
  TORCH_CHECK(p.B * p.H <= 65535, op, ": q: expected B * H <= 65535 (grid axis 1), got ", p.B * p.H);
  switch (q.scalar_type()) {
    case at::kFloat:
      launch<float, float>(p, q, k, v, position_tensor, position, out);
      break;
    case at::kHalf:
      launch<__half, c10::Half>(p, q, k, v, position_tensor, position, out);
      break;
    default:
      launch<__nv_bfloat16, c10::BFloat16>(p, q, k, v, position_tensor, position, out);
  }
  return out.transpose(1, 2);
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) { m.impl("sparse_decode_attention", &dalle_fast::sparse_decode_attention_cuda); }
