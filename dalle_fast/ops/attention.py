"""Block-sparse DALL-E attention: the public op, its registration and dispatch (DESIGN sections 2 and 4).

sparse_attention(q, k, v, kind=..., text_len=..., grid_size=...) = softmax(q k^T * scale, masked by the layer's
DALL-E mask) v, for q, k, v [B, H, L, D], L <= text_len + grid_h * grid_w.

Registered ops:
    dalle_fast::sparse_attention_fwd / _bwd   C++ kernels (CPU: csrc/cpu/attention.cpp, CUDA:
                                              csrc/cuda/attention.cu) taking the tile layout as int32 arrays
    dalle_fast::sparse_attention              the differentiable op for a kernel backend (argument `backend`:
    dalle_fast::sparse_attention_backward     "cpp", "cuda" or "triton"): builds (or fetches from the cache)
                                              the tile layout, calls the backend's kernels; opaque to
                                              torch.compile, with fakes and autograd registered here
The kernels return out, dq, dk, dv in memory order [B, L, H, D] (viewed as [B, H, L, D]), so a transformer
merges the heads back with a free view; lse is [B, H, L] fp32.
"""

import math

import torch

from .. import _extension, masks
from .._dispatch import backend_reasons, select
from ..reference.masks import sparse_attention as _reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128)
OPS = ("sparse_attention_fwd", "sparse_attention_bwd")
# Tile sizes (block_m queries x block_n keys) of the C++ backends; Triton's come from its launcher.
CXX_BLOCKS = {"cpp": (32, 32), "cuda": (64, 64)}


def _triton():
    from . import _triton_attention

    return _triton_attention


def block_sizes(backend: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) a kernel backend uses for this head size and dtype."""
    if backend == "triton":
        return _triton().block_sizes(head_dim, dtype)
    return CXX_BLOCKS[backend]


# Fakes ---------------------------------------------------------------------------------------------------


def _blhd_like(q: torch.Tensor) -> torch.Tensor:
    """A tensor of q's shape [B, H, L, D] and dtype whose memory is [B, L, H, D]."""
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def _fwd_fake(q, k, v, *args):
    return _blhd_like(q), _lse_like(q)


def _bwd_fake(grad_out, q, k, v, *args):
    return _blhd_like(q), _blhd_like(q), _blhd_like(q)


if _extension.load() is not None:  # otherwise the schemas do not exist; the dispatcher reports load_error
    torch.library.register_fake("dalle_fast::sparse_attention_fwd")(_fwd_fake)
    torch.library.register_fake("dalle_fast::sparse_attention_bwd")(_bwd_fake)


# The differentiable op over every kernel backend ---------------------------------------------------------


def _layout(q, kind, text_len, grid_h, grid_w, kernel, torus, block_m, block_n) -> masks.TileLayout:
    return masks.tile_layout(
        masks.KINDS[kind], text_len, grid_h, grid_w, block_m=block_m, block_n=block_n, seq_len=q.shape[2],
        kernel=kernel, conv_variant="torus" if torus else "clipped", device=q.device,
    )  # fmt: skip


def _kernels(backend: str):
    if backend == "triton":
        t = _triton()
        return t.sparse_attention_fwd, t.sparse_attention_bwd
    if backend in ("cpp", "cuda"):
        return torch.ops.dalle_fast.sparse_attention_fwd, torch.ops.dalle_fast.sparse_attention_bwd
    raise ValueError(f"backend: expected 'cpp', 'cuda' or 'triton', got {backend!r}")


@torch.library.custom_op("dalle_fast::sparse_attention", mutates_args=())
def _sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, kind: int, text_len: int, grid_h: int,
    grid_w: int, kernel: int, torus: bool, scale: float, block_m: int, block_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    lay = _layout(q, kind, text_len, grid_h, grid_w, kernel, torus, block_m, block_n)
    fwd, _ = _kernels(backend)
    return fwd(q, k, v, lay.kv_indptr, lay.kv_index, lay.kv_partial, kind, text_len, grid_h, grid_w, kernel, torus,
               scale, block_m, block_n)  # fmt: skip


@torch.library.custom_op("dalle_fast::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    backend: str, kind: int, text_len: int, grid_h: int, grid_w: int, kernel: int, torus: bool, scale: float,
    block_m: int, block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    lay = _layout(q, kind, text_len, grid_h, grid_w, kernel, torus, block_m, block_n)
    _, bwd = _kernels(backend)
    return bwd(grad_out, q, k, v, out, lse, lay.kv_indptr, lay.kv_index, lay.kv_partial, lay.q_indptr, lay.q_index,
               lay.q_partial, kind, text_len, grid_h, grid_w, kernel, torus, scale, block_m, block_n)  # fmt: skip


_sparse_attention.register_fake(lambda q, k, v, *args: (_blhd_like(q), _lse_like(q)))
_sparse_attention_backward.register_fake(lambda grad_out, q, *args: (_blhd_like(q), _blhd_like(q), _blhd_like(q)))


def _setup_context(ctx, inputs, output):
    q, k, v, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * (3 + len(ctx.params))
    dq, dk, dv = _sparse_attention_backward(grad_out, q, k, v, out, lse, *ctx.params)
    return (dq, dk, dv) + (None,) * len(ctx.params)


_sparse_attention.register_autograd(_backward, setup_context=_setup_context)


# Validation and dispatch ---------------------------------------------------------------------------------


def _grid(grid_size) -> tuple[int, int]:
    if isinstance(grid_size, int) and not isinstance(grid_size, bool):
        return grid_size, grid_size
    if isinstance(grid_size, (tuple, list)) and len(grid_size) == 2:
        return tuple(grid_size)
    raise ValueError(f"sparse_attention: grid_size: expected an int or a pair (grid_h, grid_w), got {grid_size!r}")


def _check_qkv(q, k, v, text_len: int, grid_h: int, grid_w: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparse_attention: {name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"sparse_attention: {name}: expected 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}"
            )
        if t.dtype not in KERNEL_DTYPES + (torch.float64,):
            raise TypeError(f"sparse_attention: {name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"sparse_attention: {name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"sparse_attention: {name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"sparse_attention: {name}: expected q's device {q.device}, got {t.device}")
    full = text_len + grid_h * grid_w
    if not 1 <= q.shape[2] <= full:
        raise ValueError(
            f"sparse_attention: q: expected a sequence length L in [1, text_len + grid_h * grid_w = {full}] "
            f"(dim 2 of [B, H, L, D]), got {q.shape[2]}"
        )


def _reasons(q: torch.Tensor):
    head_dim = q.shape[-1]

    def reasons(backend: str) -> list[str]:
        if backend == "eager":
            return []
        why = list(backend_reasons("sparse_attention_fwd", backend, q.device))
        if head_dim not in HEAD_DIMS:
            why.append(f"the kernels take head sizes {HEAD_DIMS}, got {head_dim}")
        if q.dtype not in KERNEL_DTYPES:
            why.append(f"the kernels take float16, bfloat16 and float32, got {q.dtype}")
        elif backend == "cuda" and q.dtype == torch.float32:
            why.append("the cuda kernels run float16 and bfloat16 on tensor cores (triton serves float32)")
        return why

    return reasons


def available_backends(q: torch.Tensor) -> list[str]:
    """The backends that can serve sparse_attention for tensors like q, in preference order."""
    from .._dispatch import BACKENDS

    r = _reasons(q)
    return [b for b in BACKENDS if not r(b)]


def sparse_attention(
    q, k, v, *, kind, text_len, grid_size, kernel=11, conv_variant="clipped", scale=None, backend=None, _blocks=None
):
    """softmax(q k^T * scale masked by the DALL-E mask of `kind`) v.

    q, k, v: [B, H, L, D] (any strides), L <= text_len + grid_h * grid_w (a prefix of the layout); D in {32, 64,
    128} for the kernel backends; float16, bfloat16 or float32. grid_size: grid_h or (grid_h, grid_w); kind:
    "full", "row", "column" or "conv" (kernel: odd conv size; conv_variant "clipped" or "torus"); scale
    defaults to D ** -0.5. Returns a tensor of q's shape and dtype. Differentiable in q, k and v.
    """
    grid_h, grid_w = _grid(grid_size)
    masks.check_mask_args(kind, text_len, grid_h, grid_w, kernel, conv_variant, "sparse_attention")
    _check_qkv(q, k, v, text_len, grid_h, grid_w)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"sparse_attention: scale: expected a finite float, got {scale!r}")
    chosen = select("sparse_attention", q.device, backend, _reasons(q))
    if chosen == "eager":
        return _reference(q, k, v, kind=kind, text_len=text_len, grid_size=(grid_h, grid_w), kernel=kernel,
                          conv_variant=conv_variant, scale=scale)  # fmt: skip
    block_m, block_n = _blocks or block_sizes(chosen, q.shape[-1], q.dtype)
    out, _ = _sparse_attention(q, k, v, chosen, masks.KINDS.index(kind), text_len, grid_h, grid_w, kernel,
                               conv_variant == "torus", float(scale), block_m, block_n)  # fmt: skip
    return out
