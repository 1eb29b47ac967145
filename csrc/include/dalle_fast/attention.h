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

// ---- Decoding: the keys one query reads, as a few index ranges (sparse_decode_attention) ----
//
// A query at raster position p reads exactly the keys k with raster_allowed(m, p, k), enumerated as at most
// decode_slot_count(m) ranges: slot s gives KeyRange{start, count, step} = keys start + t * step, t < count
// (count 0: an empty slot). The ranges are disjoint and their union is the mask's row p, in any order
// (dalle_fast/reference/decode.py mirrors this, and the tests check both against the dense mask):
//   slot 0       the text prefix 0 .. min(p, T - 1): one contiguous range
//   full         slot 1: the image positions T .. p
//   row          slot 1: the previous W image positions and p itself, T + max(0, i - W) .. p
//   column       slot 1: the column of p, T + col, T + col + W, ... p (strided by W)
//   conv         slots 1 + 2 r + c for window row r < decode_window_rows(m) and column part c in {0, 1}: the
//                keys of one image row inside the window, clipped at col on the query's own row (causal).
//                clipped: rows row - half .. row, one column range [col - half, col + half] cut at the borders
//                (c = 1 stays empty). torus: rows row - j mod H (j in -half .. half; all rows 0 .. row when
//                2 half + 1 >= H) kept when at or before the query's row, columns col - half .. col + half
//                mod W: one range, or two where the window wraps (all of 0 .. W - 1 when 2 half + 1 >= W).
// Only p is runtime data (a CUDA graph replays the decode step with p updated in memory): the slot count
// depends on the mask alone, so kernels loop over a fixed number of slots.
struct KeyRange {
  int start;
  int count;
  int step;
};

DF_HD int decode_window_rows(const MaskSpec& m) {
  if (m.kind != kMaskConv) return 0;
  if (!m.torus) return m.half + 1;
  return 2 * m.half + 1 < m.grid_h ? 2 * m.half + 1 : m.grid_h;
}

DF_HD int decode_slot_count(const MaskSpec& m) { return m.kind == kMaskConv ? 1 + 2 * decode_window_rows(m) : 2; }

// Contiguous keys [lo, hi] of image row `row` (empty when hi < lo), as a raster range.
DF_HD KeyRange decode_row_span(const MaskSpec& m, int row, int lo, int hi) {
  return KeyRange{m.text_len + row * m.grid_w + lo, hi >= lo ? hi - lo + 1 : 0, 1};
}

DF_HD KeyRange decode_key_range(const MaskSpec& m, int p, int slot) {
  const KeyRange empty{0, 0, 1};
  if (slot == 0) return KeyRange{0, p < m.text_len ? p + 1 : m.text_len, 1};
  if (p < m.text_len) return empty;  // a text query reads text only
  const int i = p - m.text_len, row = i / m.grid_w, col = i % m.grid_w;
  switch (m.kind) {
    case kMaskFull:
      return slot == 1 ? KeyRange{m.text_len, i + 1, 1} : empty;
    case kMaskRow: {
      const int first = i > m.grid_w ? i - m.grid_w : 0;
      return slot == 1 ? KeyRange{m.text_len + first, i - first + 1, 1} : empty;
    }
    case kMaskColumn:
      return slot == 1 ? KeyRange{m.text_len + col, row + 1, m.grid_w} : empty;
    default:
      break;
  }
  // conv: window row r, column part c
  const int r = (slot - 1) >> 1, c = (slot - 1) & 1, h = m.half;
  int krow;
  if (!m.torus) {
    krow = row - h + r;
    if (krow < 0) return empty;
  } else if (2 * h + 1 >= m.grid_h) {
    krow = r;  // every row is in the window
  } else {
    krow = row - h + r;
    krow = krow < 0 ? krow + m.grid_h : (krow >= m.grid_h ? krow - m.grid_h : krow);
  }
  if (krow > row) return empty;  // causal: rows after the query's
  const int last = krow == row ? col : m.grid_w - 1;  // causal on the query's own row
  int lo, hi;
  if (!m.torus) {
    if (c == 1) return empty;
    lo = col - h < 0 ? 0 : col - h;
    hi = col + h;
  } else if (2 * h + 1 >= m.grid_w) {
    if (c == 1) return empty;
    lo = 0;
    hi = m.grid_w - 1;
  } else if (c == 0) {  // the part inside 0 .. W - 1
    lo = col - h < 0 ? 0 : col - h;
    hi = col + h;
  } else if (col - h < 0) {  // wrapped past the left border
    lo = col - h + m.grid_w;
    hi = m.grid_w - 1;
  } else if (col + h >= m.grid_w) {  // wrapped past the right border
    lo = 0;
    hi = col + h - m.grid_w;
  } else {
    return empty;
  }
  return decode_row_span(m, krow, lo, mask_min(hi, last));
}

}  // namespace dalle_fast
