// Runs the per-element helpers of csrc/include/dalle_fast/math.h on the CPU, for tests/test_math_header.py:
// the CUDA kernels' reductions (softmax_stats_*, argmax_*) and the noise map, exercised by the very code
// the GPU compiles. Reads commands from stdin, one per line, and prints one result line per command:
//   noise SEED N            -> uint32 gumbel                (element number N of the stream of SEED)
//   softmax K z_1 .. z_K    -> m s_seq s_tree t_seq t_tree  (weights w_k = k + 1; seq: left fold of
//                                                           single-element states; tree: pairwise merges)
//   argmax K v_1 .. v_K     -> index_seq index_tree
// Floats are read with strtof ("nan", "inf", "-inf" included) and printed with %.9g.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dalle_fast/math.h"

using namespace dalle_fast;

template <typename S, typename F>
static S tree_reduce(std::vector<S> v, F combine) {
  while (v.size() > 1) {
    std::vector<S> next;
    for (size_t i = 0; i + 1 < v.size(); i += 2) next.push_back(combine(v[i], v[i + 1]));
    if (v.size() % 2) next.push_back(v.back());
    v.swap(next);
  }
  return v[0];
}

int main() {
  char cmd[32];
  while (std::scanf("%31s", cmd) == 1) {
    if (!std::strcmp(cmd, "noise")) {
      unsigned long long seed, n;
      if (std::scanf("%llu %llu", &seed, &n) != 2) return 2;
      const uint32_t bits = philox_uint32_at(seed, n);
      std::printf("%" PRIu32 " %.9g\n", bits, gumbel_from_uint32(bits));
      continue;
    }
    int k;
    if (std::scanf("%d", &k) != 1 || k <= 0) return 2;
    std::vector<float> v(k);
    for (int i = 0; i < k; ++i) {
      char tok[64];
      if (std::scanf("%63s", tok) != 1) return 2;
      v[i] = std::strtof(tok, nullptr);
    }
    if (!std::strcmp(cmd, "softmax")) {
      std::vector<SoftmaxStats> one;
      SoftmaxStats seq = softmax_stats_init();
      for (int i = 0; i < k; ++i) {
        one.push_back(softmax_stats_of(v[i], static_cast<float>(i + 1)));
        seq = softmax_stats_combine(seq, one.back());
      }
      const SoftmaxStats tree = tree_reduce(one, softmax_stats_combine);
      std::printf("%.9g %.9g %.9g %.9g %.9g\n", seq.m, seq.s, tree.s, seq.t, tree.t);
    } else if (!std::strcmp(cmd, "argmax")) {
      std::vector<ArgMaxState> one;
      ArgMaxState seq = argmax_init();
      for (int i = 0; i < k; ++i) {
        one.push_back(ArgMaxState{v[i], i});
        seq = argmax_combine(seq, one.back());
      }
      const ArgMaxState tree = tree_reduce(one, argmax_combine);
      std::printf("%" PRId64 " %" PRId64 "\n", seq.i, tree.i);
    } else {
      return 2;
    }
  }
  return 0;
}
