// Per-element math of the DALL-E sparse attention, shared by the C++ CPU and the CUDA sources
// (DESIGN sections 2 and 4). No thread, warp or memory-layout knowledge here: the CPU tests run it.
//
// Positions: T text positions, then an H x W image grid in raster order. raster_allowed(q, k) is the
// mask of dalle_fast/reference/masks.py (the oracle):
//     causal (k <= q); a text key is allowed to every later query; between image positions
//     (i = position - T, row = i / W, col = i % W):
//       full    always
//       row     i_q - i_k <= W
//       column  col_q == col_k
//       conv    |row_q - row_k| <= kernel / 2 and |col_q - col_k| <= kernel / 2, distances taken
//               modulo H and W for the torus variant.
//
// The kernels walk a processing order (dalle_fast/masks.py): raster for every kind but column, whose
// image part is taken column by column, where a column layer is block-diagonal. Processing position
// p lives at raster row processing_row(p); rows at or past seq_len are absent (a prefix of the layout).
#pragma once

#include "math.h"

namespace dalle_fast {

enum MaskKind : int { kMaskFull = 0, kMaskRow = 1, kMaskColumn = 2, kMaskConv = 3 };

struct MaskSpec {
  int kind;
  int text_len;
  int grid_h;
  int grid_w;
  int half;  // conv kernel / 2
  bool torus;
  int seq_len;  // rows present (<= text_len + grid_h * grid_w)
};

DF_HD int mask_abs(int x) { return x < 0 ? -x : x; }
DF_HD int mask_min(int a, int b) { return a < b ? a : b; }

// Raster row of processing position p.
DF_HD int processing_row(const MaskSpec& m, int p) {
  if (m.kind != kMaskColumn || p < m.text_len) return p;
  const int i = p - m.text_len;
  return m.text_len + (i % m.grid_h) * m.grid_w + i / m.grid_h;
}

// Number of processing positions (the whole layout for column layers with image rows present).
DF_HD int processing_length(const MaskSpec& m) {
  return (m.kind == kMaskColumn && m.seq_len > m.text_len) ? m.text_len + m.grid_h * m.grid_w : m.seq_len;
}

// A raster position with its image coordinates (row = i / W, col = i % W of i = position - T; 0 for text
// positions, where they are not used). The kernels compute these once per tile row and column, so that the
// element mask of a tile costs no integer division per pair.
struct MaskPoint {
  int r;    // raster row
  int row;  // image row
  int col;  // image column
};

DF_HD MaskPoint mask_point_raster(const MaskSpec& m, int r) {
  const int i = r < m.text_len ? 0 : r - m.text_len;
  return MaskPoint{r, i / m.grid_w, i % m.grid_w};
}

// The point of processing position p.
DF_HD MaskPoint mask_point(const MaskSpec& m, int p) { return mask_point_raster(m, processing_row(m, p)); }

// raster_allowed of two points (the one definition of the predicate).
DF_HD bool raster_allowed_points(const MaskSpec& m, MaskPoint q, MaskPoint k) {
  if (k.r > q.r) return false;
  if (k.r < m.text_len) return true;
  switch (m.kind) {  // both are image positions here
    case kMaskRow:
      return q.r - k.r <= m.grid_w;
    case kMaskColumn:
      return q.col == k.col;
    case kMaskConv: {
      int dr = mask_abs(q.row - k.row);
      int dc = mask_abs(q.col - k.col);
      if (m.torus) {
        dr = mask_min(dr, m.grid_h - dr);
        dc = mask_min(dc, m.grid_w - dc);
      }
      return dr <= m.half && dc <= m.half;
    }
    default:
      return true;
  }
}

DF_HD bool raster_allowed(const MaskSpec& m, int q, int k) {
  return raster_allowed_points(m, mask_point_raster(m, q), mask_point_raster(m, k));
}

// processing_allowed of the points of two processing positions.
DF_HD bool processing_allowed_points(const MaskSpec& m, MaskPoint q, MaskPoint k) {
  return q.r < m.seq_len && k.r < m.seq_len && raster_allowed_points(m, q, k);
}

// The element mask of a partial tile, in processing positions; absent rows are never allowed.
DF_HD bool processing_allowed(const MaskSpec& m, int pq, int pk) {
  return processing_allowed_points(m, mask_point(m, pq), mask_point(m, pk));
}

// Online softmax over key tiles, per query row: m running max of the scaled scores, l running sum of
// exp(s - m). A row may see a tile where every key is masked (-inf) before its first allowed key, so
// -inf maxima are handled explicitly (exp(-inf - -inf) would be NaN).
DF_HD float online_softmax_shift(float m) { return m == -INFINITY ? 0.f : m; }  // subtract before exp
DF_HD float online_softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : expf(m_old - m_new);  // factor for the old l and accumulator
}
// logsumexp of the row, kept for the backward: -inf for a row without any allowed key (never a present
// row: each sees itself).
DF_HD float online_softmax_lse(float m, float l) { return l > 0.f ? m + logf(l) : -INFINITY; }

}  // namespace dalle_fast
