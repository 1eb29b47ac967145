// Host-side checks of sparse_decode_attention shared by the CPU and CUDA launchers (needs ATen; never included
// by device code). Each message names the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "dalle_fast/attention.h"

namespace dalle_fast {

struct DecodeProblem {
  MaskSpec m;
  int64_t B, H, n, D, Lmax;
  float scale;
};

inline DecodeProblem decode_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kind,
                                    int64_t text_len, int64_t grid_h, int64_t grid_w, int64_t kernel, bool torus,
                                    double scale, c10::DeviceType device_type, const char* op) {
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q", &q}, {"k_cache", &k}, {"v_cache", &v}};
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(t->device().type() == device_type, op, ": ", name, ": expected a ", c10::DeviceTypeName(device_type),
                " tensor, got device ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, ": expected 4 dimensions [B, H, L, D], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, ": expected q's dtype ", q.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, ": expected q's device ", q.device(), ", got ", t->device());
  }
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": q: expected float16, bfloat16 or float32, got ", st);
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": q: expected a head size (dim 3) in (32, 64, 128), got ", D);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": v_cache: expected the shape of k_cache ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == D, op,
              ": k_cache: expected [B, H, Lmax, D] with q's B, H, D = ", q.size(0), ", ", q.size(1), ", ", D, ", got ",
              k.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 3, op, ": kind: expected 0 (full), 1 (row), 2 (column) or 3 (conv), got ", kind);
  TORCH_CHECK(text_len >= 0 && grid_h >= 1 && grid_w >= 1, op,
              ": text_len, grid_h, grid_w: expected text_len >= 0 and a grid of at least 1 x 1, got ", text_len, ", ",
              grid_h, ", ", grid_w);
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, op, ": kernel: expected an odd int >= 1, got ", kernel);
  TORCH_CHECK(std::isfinite(scale), op, ": scale: expected a finite float, got ", scale);
  const int64_t full = text_len + grid_h * grid_w;
  TORCH_CHECK(full < INT32_MAX, op, ": text_len + grid_h * grid_w: expected < 2**31, got ", full);
  const int64_t Lmax = k.size(2);
  TORCH_CHECK(Lmax <= full, op, ": k_cache: expected Lmax (dim 2) <= text_len + grid_h * grid_w = ", full, ", got ",
              Lmax);
  MaskSpec m{static_cast<int>(kind), static_cast<int>(text_len), static_cast<int>(grid_h), static_cast<int>(grid_w),
             static_cast<int>(kernel / 2), torus && kind == kMaskConv, static_cast<int>(full)};
  return DecodeProblem{m, q.size(0), q.size(1), q.size(2), D, Lmax, static_cast<float>(scale)};
}

// The position tensor: 0-dim (or one element) int64 on q's device.
inline void check_position_tensor(const std::optional<at::Tensor>& pt, const at::Tensor& q, const char* op) {
  if (!pt.has_value()) return;
  TORCH_CHECK(pt->numel() == 1 && pt->dim() <= 1, op,
              ": position: expected a 0-dim int64 tensor, got shape ", pt->sizes());
  TORCH_CHECK(pt->scalar_type() == at::kLong, op, ": position: expected an int64 tensor, got ", pt->scalar_type());
  TORCH_CHECK(pt->device() == q.device(), op, ": position: expected q's device ", q.device(), ", got ", pt->device());
}

inline void check_position_value(int64_t position, const DecodeProblem& p, const char* op) {
  TORCH_CHECK(position >= 0 && position + p.n <= p.Lmax, op, ": position: expected 0 <= position and position + n <= ",
              "Lmax (n = ", p.n, " queries, Lmax = ", p.Lmax, "), got ", position);
}

// out: memory [B, n, H, D], viewed as [B, H, n, D] by the caller.
inline at::Tensor decode_out_bnhd(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
}

}  // namespace dalle_fast
