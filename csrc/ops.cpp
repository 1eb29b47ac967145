// Every schema of dalle_fast lives here (DESIGN section 1). Implementations register themselves from
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fakes and autograd are registered from Python
// (dalle_fast/ops), so opcheck and torch.compile work on every op.
//
// Conventions shared by the ops:
//   seed    a 64-bit Philox key passed as int64 (two's complement of values in [2**63, 2**64))
//   offset  the element number of the tensor's first logical element (DESIGN section 3), >= 0
//   dim     already normalised to [0, logits.dim()) by the Python wrapper; checked again here
#include <Python.h>
#include <torch/library.h>

// An importable module, so that `import dalle_fast._C` loads the library and runs the registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(dalle_fast, m) {
  // Gumbel noise of the logical shape `shape`; `like` is an empty tensor that carries device and dtype.
  m.def("gumbel_noise(Tensor like, int[] shape, int seed, int offset) -> Tensor");
  // softmax((logits + g) / tau, dim) in logits' dtype (hard: the one-hot of the argmax), contiguous.
  m.def("gumbel_softmax_fwd(Tensor logits, float tau, bool hard, int dim, int seed, int offset) -> Tensor");
  // d loss / d logits of the soft relaxation (also the straight-through gradient of hard mode),
  // recomputed from the logits and the seed: (1/tau) * y * (grad - sum(grad * y, dim)).
  m.def("gumbel_softmax_bwd(Tensor grad, Tensor logits, float tau, int dim, int seed, int offset) -> Tensor");
  // argmax(logits + g, dim) as int64, dim removed (torch.argmax semantics: first index on ties, NaN wins).
  m.def("gumbel_argmax(Tensor logits, int dim, int seed, int offset) -> Tensor");

  // Block-sparse DALL-E attention (DESIGN section 4; dalle_fast/masks.py, csrc/include/dalle_fast/attention.h).
  // q, k, v [B, H, L, D]; kind 0 full, 1 row, 2 column, 3 conv; kernel the conv size; torus its variant.
  // The tile layout (dalle_fast.masks.tile_layout for block_m x block_n tiles of the processing order) is
  // passed in as int32 CSR arrays: per query tile the key tiles to visit (kv_*), per key tile the query
  // tiles that visit it (q_*); *_partial marks tiles that need the element mask.
  // Returns out (memory [B, L, H, D], viewed as [B, H, L, D]) in q's dtype and lse [B, H, L] fp32 (the
  // natural logsumexp of the scaled, masked scores of each query row).
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_indptr, Tensor kv_index, Tensor kv_partial, "
      "int kind, int text_len, int grid_h, int grid_w, int kernel, bool torus, float scale, int block_m, "
      "int block_n) -> (Tensor, Tensor)");
  // Gradients (dq, dk, dv), each like the forward's out (memory [B, L, H, D]); grad_out may be strided.
  m.def(
      "sparse_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor kv_indptr, Tensor kv_index, Tensor kv_partial, Tensor q_indptr, Tensor q_index, Tensor q_partial, "
      "int kind, int text_len, int grid_h, int grid_w, int kernel, bool torus, float scale, int block_m, "
      "int block_n) -> (Tensor, Tensor, Tensor)");

  // The dVAE's fused ops (DESIGN section 5; math in csrc/include/dalle_fast/dvae.h). reduction: 0 none, 1 mean,
  // 2 sum (torch's order).
  // conv1x1(gumbel_softmax(logits, tau, hard, dim=1), weight, bias) without the [B, K, *spatial] relaxation:
  // logits [B, K, *spatial], weight [C, K], bias [C] -> (out [B, C, *spatial] in logits' dtype, lse [B, S]
  // fp32 = logsumexp over K of (logits + g) / tau per pixel, idx [B, S] int64 = argmax of logits + g in hard
  // mode, else [0, 0]).
  m.def(
      "gumbel_quantize_fwd(Tensor logits, Tensor weight, Tensor? bias, float tau, bool hard, int seed, int offset) "
      "-> (Tensor, Tensor, Tensor)");
  // (d logits [contiguous, logits' dtype], d weight [C, K], weight's dtype) of the soft relaxation (hard:
  // straight-through: soft d logits, one-hot d weight), recomputed from logits, seed and the forward's lse/idx.
  m.def(
      "gumbel_quantize_bwd(Tensor grad, Tensor logits, Tensor weight, Tensor lse, Tensor idx, float tau, bool hard, "
      "int seed, int offset) -> (Tensor, Tensor)");
  // -ln f(x | mu, exp(log_b)) of the logit-Laplace density, fp32 (x, mu, log_b of one shape and dtype).
  m.def("logit_laplace_nll_fwd(Tensor x, Tensor mu, Tensor log_b, int reduction) -> Tensor");
  // (d x, d mu, d log_b) in the inputs' dtype.
  m.def(
      "logit_laplace_nll_bwd(Tensor grad, Tensor x, Tensor mu, Tensor log_b, int reduction) -> (Tensor, Tensor, "
      "Tensor)");
  // KL(softmax(logits, dim) || uniform) fp32 (reduced, or logits' shape without dim), and the per-row
  // stats [2, rows] fp32 (lse, sum q ln q) the backward reads.
  m.def("categorical_kl_uniform_fwd(Tensor logits, int dim, int reduction) -> (Tensor, Tensor)");
  m.def("categorical_kl_uniform_bwd(Tensor grad, Tensor logits, Tensor stats, int dim, int reduction) -> Tensor");
}

// Scaled matmul family (DESIGN section 6; semantics in dalle_fast/reference/matmul.py). Registered as a second
// block so that each family's schemas stay together.
//   s = alpha * scale: scale is an optional 0-dim fp32 tensor on the op's device, read there (no host sync).
//   The flag is int32 of shape [1]: 1 when filter_nonfinite found an element that is not finite in the
//   output dtype (that element is written as 0), else 0. Ops with autograd cannot mutate their arguments,
//   so the flag is returned; the public functions OR it into the caller's nonfinite_flag.
TORCH_LIBRARY_FRAGMENT(dalle_fast, m) {
  // out = s * (a @ b) + bias, fp32 accumulation. a [..., M, K], b [K, N], bias [N]. a and b share a dtype
  // (fp16, bf16, fp32; out in it), or a is fp32 and b fp16/bf16: a is multiplied by s and rounded to b's
  // dtype as it is read (out in b's dtype).
  m.def(
      "scaled_matmul(Tensor a, Tensor b, Tensor? bias, float alpha, Tensor? scale, bool filter_nonfinite)"
      " -> (Tensor out, Tensor flag)");
  // out = x * s (x / s when invert) rounded to dtype, fp32 math: the block-entry unscale (and filter and flag)
  // of the per-resblock gradient scaling, and the scaled cast at the block's exit.
  m.def(
      "scale_filter(Tensor x, float alpha, Tensor? scale, bool invert, bool filter_nonfinite, ScalarType dtype)"
      " -> (Tensor out, Tensor flag)");
}

// Cached decoding attention (issue 7; semantics in dalle_fast/ops/decode.py, key ranges in
// csrc/include/dalle_fast/attention.h). q [B, H, n, D] holds the queries at raster positions position ..
// position + n - 1; k_cache, v_cache [B, H, Lmax, D] (any strides; rows past position + n - 1 are never read).
// The position comes from position_tensor when given (a 0-dim int64 tensor on q's device, read on the device by
// the CUDA kernel, so that a CUDA graph can replay the step with it updated in place), else from `position`.
// kind 0 full, 1 row, 2 column, 3 conv (kernel, torus as in sparse_attention_fwd). Returns out (memory
// [B, n, H, D], viewed as [B, H, n, D]) in q's dtype, fp32 math. Inference only: no autograd.
TORCH_LIBRARY_FRAGMENT(dalle_fast, m) {
  m.def(
      "sparse_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? position_tensor, int position, "
      "int kind, int text_len, int grid_h, int grid_w, int kernel, bool torus, float scale) -> Tensor");
}

// One decoding step of a whole pre-norm transformer (issue 7; dalle_fast/ops/fused_step.py), C++ CPU only:
// x [B, d] float32, the residual stream of the token at raster position `position`. Block i (kinds[i]: -1
// an MLP, 0 .. 3 an attention layer of that mask kind) takes params[6 i .. 6 i + 5] = norm gain, norm bias,
// in weight, in bias, out weight, out bias (attention in = qkv, d -> 3 d; MLP in = fc, d -> hidden, GELU) and
// eps[i]; params[6 n ..] and eps[n] are the final norm and the head (d -> V). A weight of N outputs and K inputs
// comes packed in panels of 16 outputs, [ceil(N / 16), K, 16] (zero past N; dalle_fast/ops/fused_step.py
// packs them). The k and v of
// attention layer j are written into row `position` of k_caches[j], v_caches[j] ([B, Lmax, H, D], rows of
// H * D contiguous floats), then its query attends the keys the mask allows (dense: every row up to
// `position`, masked per key). Returns the head's logits [B, V] (float32). Inference only.
TORCH_LIBRARY_FRAGMENT(dalle_fast, m) {
  m.def(
      "decode_step(Tensor x, Tensor[] params, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int position, "
      "int[] kinds, float[] eps, int n_heads, int text_len, int grid_h, int grid_w, int kernel, bool torus, "
      "bool dense) -> Tensor");
}

// Fused sampling (issue 7; semantics in dalle_fast/ops/sampling.py). One category per row of the last dim:
// int64 [*logits.shape[:-1]]. z = logits / temperature (fp32); top_k 0 = none, else in [1, V]: keep z >= the
// k-th largest; top_p 1.0 = none, else in (0, 1): keep the smallest set of the largest (after top-k) with
// softmax mass >= top_p, ties kept; then argmax of z + g over the kept entries, g the Gumbel noise of
// element number offset + logical index. An invalid row (NaN, +inf z, or all -inf) gives -1: the op never
// raises on data (no host sync; capturable in a CUDA graph).
TORCH_LIBRARY_FRAGMENT(dalle_fast, m) {
  m.def("sample(Tensor logits, float temperature, int top_k, float top_p, int seed, int offset) -> Tensor");
}

// The loss head (issue 6; dalle_fast/ops/loss.py, csrc/include/dalle_fast/loss.h): sum_i CE(x_i W^T + b, t_i)
// over chunks of chunk_size rows, computing with the loss the gradients asked for (grad_*), which backward
// only scales. x [N, d], weight [V, d], bias [V] (one dtype: fp16, bf16 or fp32), target int64 [N] in [0, V)
// (out of range: a NaN loss). Returns (loss fp32 0-dim, dx [N, d] x's dtype, dweight [V, d], dbias [V]); a
// gradient not asked for (or dbias without a bias) is an empty [0] tensor. Functional: the [chunk, V] logits
// buffer that the fused row pass overwrites with softmax - onehot is owned by the op.
TORCH_LIBRARY_FRAGMENT(dalle_fast, m) {
  m.def(
      "linear_cross_entropy(Tensor x, Tensor weight, Tensor? bias, Tensor target, int chunk_size, bool grad_x, "
      "bool grad_weight, bool grad_bias) -> (Tensor loss, Tensor dx, Tensor dweight, Tensor dbias)");
}
