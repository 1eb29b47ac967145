"""One decoding step of a whole pre-norm transformer in one call: decode_step (issue 7).

    bind_decode_step(blocks, head, k_caches, v_caches, *, n_heads, text_len, grid_size, kernel=11,
                     conv_variant="clipped", dense=False, backend=None) -> f(x, position) -> logits
    decode_step(x, position, blocks, head, k_caches, v_caches, *, ...same keywords) -> logits

At the sizes a CPU decodes (a few rows of d_model 128 .. 512) one step is dozens of small ops, and their
per-call costs are most of it (the dispatcher; ATen's GEMV, a few GFLOP/s at one row; GELU, layer norm and
allocation). This op runs the step in C++: per resblock the layer norm, the in projection (attention: q, k, v,
k and v written into the cache at `position`; MLP: fc and GELU), the attention of q to the keys the layer's
mask allows (sparse_decode_attention's key ranges; dense=True: every cache row up to `position`, masked per
key, as a dense cache does: the benchmarks' like-for-like peer), the out projection and the residual; then the
final norm and the head. DALLE.generate uses it on the CPU in float32 (dalle_fast/nn/decoding.py); on a GPU the
op-by-op step is captured in a CUDA graph instead, so this op has no GPU backend.

Backends:
    cpp    torch.ops.dalle_fast.decode_step        csrc/cpu/decode.cpp (float32; head sizes 32, 64, 128; the
                                                    weights packed once by bind: pack_weight)
    eager  dalle_fast.reference.decode.decode_step  the same step op by op (any float dtype; fp64 is the
                                                    tests' oracle)
Not differentiable (inference only). The registered op mutates the caches (schema `Tensor(a!)[]`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _extension, masks
from .._dispatch import backend_reasons, select
from ..reference import decode as _ref
from .decode import _grid

OPS = ("decode_step",)  # CPU only (check_registered.py asks for no CUDA kernel)
_OP = "decode_step"
HEAD_DIMS = (32, 64, 128)


class DecodeBlock(NamedTuple):
    """One pre-norm resblock: x + out(act(in(layer_norm(x)))). kind: the mask kind of an attention layer (in =
    the qkv projection [3 d, d], heads split as [3, H, D]) or None for an MLP (in = fc [hidden, d], GELU)."""

    kind: str | None
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    norm_eps: float
    in_weight: torch.Tensor
    in_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor


class DecodeHead(NamedTuple):
    """The final layer norm and the output projection: logits = weight layer_norm(x) + bias."""

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    norm_eps: float
    weight: torch.Tensor
    bias: torch.Tensor


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight [N, K] as the cpp kernel reads it: panels of 16 output rows, [ceil(N / 16), K, 16], zero
    past N (each panel's loads are contiguous and it stays in cache while every input row passes)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // 16) * 16, k, dtype=weight.dtype, device=weight.device)
    padded[:n] = weight
    return padded.view(-1, 16, k).transpose(1, 2).contiguous()


def _fake(x, params, k_caches, v_caches, position, kinds, eps, n_heads, text_len, grid_h, grid_w, kernel, torus,
          dense):  # fmt: skip
    return x.new_empty(x.shape[0], params[-1].shape[0])  # [B, V]: V from the head bias


if _extension.load() is not None:  # otherwise the schema does not exist; the dispatcher reports load_error
    torch.library.register_fake(f"dalle_fast::{_OP}")(_fake)


def _tensor(t, name: str, shape: tuple, dtype, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_OP}: {name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{_OP}: {name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{_OP}: {name}: expected the dtype of the first block's weights {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{_OP}: {name}: expected the device of the first block's weights {device}, got {t.device}")
    return t.detach()


def _check(blocks, head, k_caches, v_caches, n_heads, text_len, grid_h, grid_w, kernel, conv_variant):
    """The blocks and head with detached tensors, after checking every shape, dtype and device."""
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, DecodeBlock) for b in blocks):
        raise TypeError(f"{_OP}: blocks: expected a sequence of DecodeBlock, got {type(blocks).__name__}")
    if not isinstance(head, DecodeHead):
        raise TypeError(f"{_OP}: head: expected a DecodeHead, got {type(head).__name__}")
    ref = blocks[0].norm_weight if blocks else head.norm_weight
    if not isinstance(ref, torch.Tensor) or ref.dim() != 1:
        raise ValueError(f"{_OP}: norm_weight: expected a 1-dim tensor [d_model], got {ref!r:.80}")
    d, dtype, dev = ref.shape[0], ref.dtype, ref.device
    if not (isinstance(n_heads, int) and n_heads >= 1 and d % n_heads == 0):
        raise ValueError(f"{_OP}: n_heads: expected a positive divisor of d_model = {d}, got {n_heads!r}")
    out_blocks = []
    n_attn = sum(b.kind is not None for b in blocks)
    for i, b in enumerate(blocks):
        if b.kind is not None:
            masks.check_mask_args(b.kind, text_len, grid_h, grid_w, kernel, conv_variant, _OP)
        if not (isinstance(b.norm_eps, (int, float)) and math.isfinite(b.norm_eps) and b.norm_eps > 0):
            raise ValueError(f"{_OP}: blocks[{i}].norm_eps: expected a finite float > 0, got {b.norm_eps!r}")
        hid = 3 * d if b.kind is not None else getattr(b.in_weight, "shape", (0,))[0]
        shapes = {"norm_weight": (d,), "norm_bias": (d,), "in_weight": (hid, d), "in_bias": (hid,),
                  "out_weight": (d, d if b.kind is not None else hid), "out_bias": (d,)}  # fmt: skip
        t = {k: _tensor(getattr(b, k), f"blocks[{i}].{k}", shape, dtype, dev) for k, shape in shapes.items()}
        out_blocks.append(b._replace(norm_eps=float(b.norm_eps), **t))
    if not (isinstance(head.norm_eps, (int, float)) and math.isfinite(head.norm_eps) and head.norm_eps > 0):
        raise ValueError(f"{_OP}: head.norm_eps: expected a finite float > 0, got {head.norm_eps!r}")
    v = getattr(head.weight, "shape", (0,))[0]
    shapes = {"norm_weight": (d,), "norm_bias": (d,), "weight": (v, d), "bias": (v,)}
    t = {k: _tensor(getattr(head, k), f"head.{k}", shape, dtype, dev) for k, shape in shapes.items()}
    out_head = head._replace(norm_eps=float(head.norm_eps), **t)
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        if not isinstance(caches, (list, tuple)) or len(caches) != n_attn:
            got = len(caches) if isinstance(caches, (list, tuple)) else type(caches).__name__
            raise ValueError(f"{_OP}: {name}: expected a list of {n_attn} caches (one per attention block), got {got}")
        for j, c in enumerate(caches):
            shape = getattr(c, "shape", None)
            if shape is None or len(shape) != 4 or shape[2:] != (n_heads, d // n_heads):
                got = tuple(shape) if shape is not None else type(c).__name__
                raise ValueError(
                    f"{_OP}: {name}[{j}]: expected a tensor [B, Lmax, H, D] with H, D = {n_heads}, {d // n_heads}, "
                    f"got {got}"
                )
            if shape[:2] != k_caches[0].shape[:2]:
                raise ValueError(f"{_OP}: {name}[{j}]: expected B, Lmax = {tuple(k_caches[0].shape[:2])} like "
                                 f"k_caches[0], got {tuple(shape[:2])}")  # fmt: skip
            if c.dtype != dtype or c.device != dev:
                raise TypeError(f"{_OP}: {name}[{j}]: expected {dtype} on {dev} like the weights, got {c.dtype} on "
                                f"{c.device}")  # fmt: skip
            if shape[1] > text_len + grid_h * grid_w:
                raise ValueError(f"{_OP}: {name}[{j}]: expected Lmax <= text_len + grid_h * grid_w = "
                                 f"{text_len + grid_h * grid_w}, got {shape[1]}")  # fmt: skip
    return out_blocks, out_head, d, dtype, dev


def _reasons(d: int, n_heads: int, dtype: torch.dtype, device: torch.device, caches):
    def reasons(backend: str) -> list[str]:
        if backend == "eager":
            return []
        if backend in ("triton", "cuda"):
            return [f"{_OP} has no {backend} kernel: on a GPU, DALLE.generate captures the op-by-op step in a CUDA "
                    "graph instead"]  # fmt: skip
        why = list(backend_reasons(_OP, backend, device))
        if dtype != torch.float32:
            why.append(f"the cpp kernel takes float32, got {dtype}")
        if d // n_heads not in HEAD_DIMS:
            why.append(f"the cpp kernel takes head sizes {HEAD_DIMS}, got {d // n_heads}")
        if any(c.stride(-1) != 1 or c.stride(-2) != c.shape[-1] for c in caches):
            why.append("the cpp kernel reads cache rows of H * D contiguous elements")
        return why

    return reasons


def bind_decode_step(blocks, head, k_caches, v_caches, *, n_heads, text_len, grid_size, kernel=11,
                     conv_variant="clipped", dense=False, backend=None):  # fmt: skip
    """`f(x, position) -> logits`: decode_step with the blocks, head and caches checked and resolved once, here
    (the weights detached and, for cpp, packed once: pack_weight), for a decoding loop whose steps differ in x
    and position only. The kernel still checks what it reads each call (shapes, the position's range)."""
    grid_h, grid_w = _grid(grid_size, _OP)
    blocks, head, d, dtype, dev = _check(blocks, head, k_caches, v_caches, n_heads, text_len, grid_h, grid_w, kernel,
                                         conv_variant)  # fmt: skip
    chosen = select(_OP, dev, backend, _reasons(d, n_heads, dtype, dev, list(k_caches) + list(v_caches)))
    k_caches, v_caches = list(k_caches), list(v_caches)
    lmax = k_caches[0].shape[1] if k_caches else None
    batch = k_caches[0].shape[0] if k_caches else None

    def check_call(x, position):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != d or x.dtype != dtype or x.device != dev:
            what = f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{_OP}: x: expected a {dtype} tensor [B, {d}] on {dev}, got {what}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{_OP}: x: expected the caches' batch {batch} rows, got {x.shape[0]}")
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"{_OP}: position: expected an int, got {type(position).__name__}")
        if lmax is not None and not 0 <= position < lmax:
            raise ValueError(f"{_OP}: position: expected 0 <= position < Lmax = {lmax}, got {position}")

    if chosen == "eager":
        kw = {"n_heads": n_heads, "text_len": text_len, "grid_size": (grid_h, grid_w), "kernel": kernel,
              "conv_variant": conv_variant}  # fmt: skip

        def call_eager(x, position):
            check_call(x, position)
            return _ref.decode_step(x, blocks, head, k_caches, v_caches, position, **kw)

        return call_eager
    params = [t for b in blocks for t in (b.norm_weight, b.norm_bias, pack_weight(b.in_weight), b.in_bias,
                                          pack_weight(b.out_weight), b.out_bias)]  # fmt: skip
    params = [t.contiguous() for t in params + [head.norm_weight, head.norm_bias, pack_weight(head.weight), head.bias]]
    kinds = [-1 if b.kind is None else masks.KINDS.index(b.kind) for b in blocks]
    eps = [b.norm_eps for b in blocks] + [head.norm_eps]
    static = (kinds, eps, n_heads, text_len, grid_h, grid_w, kernel, conv_variant == "torus", bool(dense))
    fn = torch.ops.dalle_fast.decode_step.default

    def call(x, position):
        check_call(x, position)
        return fn(x, params, k_caches, v_caches, position, *static)

    return call


def available_backends(op_name: str, device) -> list[str]:
    """The backends that can serve decode_step on `device` (float32 and the kernels' head sizes for cpp)."""
    from .._dispatch import BACKENDS

    dev = torch.device(device)
    return [b for b in BACKENDS if b == "eager" or (b == "cpp" and not backend_reasons(_OP, b, dev))]


def decode_step(x, position, blocks, head, k_caches, v_caches, *, n_heads, text_len, grid_size, kernel=11,
                conv_variant="clipped", dense=False, backend=None):  # fmt: skip
    """One decoding step of a pre-norm transformer: the logits [B, V] for the token after the one whose
    residual stream is x [B, d] (float32 for cpp), at raster position `position` (an int). blocks: a sequence
    of DecodeBlock (attention layers with a mask kind, MLPs with kind None), head: a DecodeHead; k_caches,
    v_caches: one [B, Lmax, H, D] tensor each per attention block (rows before `position` filled; row
    `position` is written here). dense=True reads every row up to `position` and masks per key (same result,
    a dense cache's cost). Not differentiable."""
    parts = [x, *(blocks if isinstance(blocks, (list, tuple)) else ()), head]
    tensors = [t for p in parts for t in (p if isinstance(p, tuple) else (p,)) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{_OP}: an input requires grad, but decode_step has no backward (inference only): call it under "
            "torch.no_grad() / torch.inference_mode(), or detach the inputs"
        )
    bound = bind_decode_step(blocks, head, k_caches, v_caches, n_heads=n_heads, text_len=text_len,
                             grid_size=grid_size, kernel=kernel, conv_variant=conv_variant, dense=dense,
                             backend=backend)  # fmt: skip
    return bound(x, position)
