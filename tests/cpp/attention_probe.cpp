// Runs the mask predicate of csrc/include/dalle_fast/attention.h on the CPU, for tests/test_attention_header.py:
// the element mask the CUDA kernels apply on partial tiles, exercised by the very code the GPU compiles.
// Reads one command per line from stdin:
//   mask KIND TEXT_LEN GRID_H GRID_W KERNEL TORUS SEQ_LEN
// and prints processing_length, then the raster row of each processing position, then the mask in
// processing order, one row of 0/1 per query position.
#include <cstdio>
#include <string>

#include "dalle_fast/attention.h"

using namespace dalle_fast;

int main() {
  char cmd[16];
  int kind, text_len, grid_h, grid_w, kernel, torus, seq_len;
  while (std::scanf("%15s %d %d %d %d %d %d %d", cmd, &kind, &text_len, &grid_h, &grid_w, &kernel, &torus,
                    &seq_len) == 8) {
    const MaskSpec m{kind, text_len, grid_h, grid_w, kernel / 2, torus != 0, seq_len};
    const int n = processing_length(m);
    std::printf("%d\n", n);
    for (int p = 0; p < n; ++p) std::printf("%d ", processing_row(m, p));
    std::printf("\n");
    std::string row(n, '0');
    for (int q = 0; q < n; ++q) {
      for (int k = 0; k < n; ++k) row[k] = processing_allowed(m, q, k) ? '1' : '0';
      std::printf("%s\n", row.c_str());
    }
  }
  return 0;
}
