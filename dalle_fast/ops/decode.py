"""Cached decoding attention: sparse_decode_attention, the attention of the newest query (or a few) to a
preallocated KV cache through only the keys the layer's DALL-E mask allows (issue 7; DESIGN sections 2 and 4).

    sparse_decode_attention(q, k_cache, v_cache, *, kind, position, text_len, grid_size, kernel=11,
                            conv_variant="clipped", scale=None, backend=None) -> out

The query at raster position p attends key k iff dalle_fast.reference.masks.allowed(kind, p, k): the same row
as the training op (ops.sparse_attention) computes for position p. The keys it reads are a few index ranges
(dalle_fast/reference/decode.py, csrc/include/dalle_fast/attention.h): the text prefix, then e.g. for a row
layer the previous W image positions (T + 33 keys at the paper's 32 x 32 grid instead of up to 1280).

How one call travels: validation here, a backend (dalle_fast._dispatch), then that backend's registered op:
    cpp / cuda  torch.ops.dalle_fast.sparse_decode_attention          csrc/cpu/decode.cpp, csrc/cuda/decode.cu
    triton      torch.ops.dalle_fast.triton_sparse_decode_attention   custom_op around ops/_triton_decode.py
    eager       dalle_fast.reference.decode                           gathers the allowed keys (the oracle's
                                                                      twin; the tests' oracle is dense_mask)
Both registered ops have fakes (torch.compile(fullgraph=True) traces them) and no autograd: decoding is
inference, and a call with grad mode on and an input that requires grad raises.
"""

import math

import torch

from .. import _extension, masks
from .._dispatch import backend_reasons, select
from ..reference import decode as _ref

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128)
OPS = ("sparse_decode_attention",)
_OP = "sparse_decode_attention"


def _out_like(q: torch.Tensor) -> torch.Tensor:
    """q's shape [B, H, n, D] and dtype, memory [B, n, H, D] (a transformer merges the heads with a free view)."""
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def _fake(q, k_cache, v_cache, position_tensor, position, kind, text_len, grid_h, grid_w, kernel, torus, scale):
    return _out_like(q)


if _extension.load() is not None:  # otherwise the schema does not exist; the dispatcher reports load_error
    torch.library.register_fake(f"dalle_fast::{_OP}")(_fake)


@torch.library.custom_op("dalle_fast::triton_sparse_decode_attention", mutates_args=())
def _triton_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position_tensor: torch.Tensor | None,
    position: int, kind: int, text_len: int, grid_h: int, grid_w: int, kernel: int, torus: bool, scale: float,
) -> torch.Tensor:  # fmt: skip
    from . import _triton_decode

    return _triton_decode.sparse_decode_attention(
        q, k_cache, v_cache, position_tensor, position, kind, text_len, grid_h, grid_w, kernel, torus, scale
    )


_triton_op.register_fake(_fake)


# Validation and dispatch ---------------------------------------------------------------------------------


def _grid(grid_size, op: str = _OP) -> tuple[int, int]:
    if isinstance(grid_size, int) and not isinstance(grid_size, bool):
        return grid_size, grid_size
    if isinstance(grid_size, (tuple, list)) and len(grid_size) == 2:
        return tuple(grid_size)
    raise ValueError(f"{op}: grid_size: expected an int or a pair (grid_h, grid_w), got {grid_size!r}")


def _check_tensors(q, k_cache, v_cache, text_len, grid_h, grid_w) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name}: expected 4 dimensions [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES + (torch.float64,):
            raise TypeError(f"{_OP}: {name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    b, h, n, d = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (b, h, d):
            raise ValueError(
                f"{_OP}: {name}: expected [B, H, Lmax, D] with q's B, H, D = ({b}, {h}, {d}), got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: {name}: expected q's device {q.device}, got {t.device}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"{_OP}: v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    full = text_len + grid_h * grid_w
    if k_cache.shape[2] > full:
        raise ValueError(
            f"{_OP}: k_cache: expected Lmax (dim 2) <= text_len + grid_h * grid_w = {full}, got {k_cache.shape[2]}"
        )
    if n < 1:
        raise ValueError(f"{_OP}: q: expected at least one query (dim 2 of [B, H, n, D]), got {n}")


def _check_position(position, q: torch.Tensor, lmax: int) -> tuple[torch.Tensor | None, int]:
    """(position tensor or None, position int). A tensor is checked for shape, dtype and device here; its value
    is checked by the CPU backends (which read it) and, on CUDA, only by the kernels (no host sync): a CUDA
    tensor position out of range gives NaN outputs, never a read outside the cache."""
    n = q.shape[2]
    if isinstance(position, torch.Tensor):
        if position.dim() != 0 or position.dtype != torch.int64:
            raise TypeError(
                f"{_OP}: position: expected an int or a 0-dim int64 tensor, got a {position.dtype} tensor of shape "
                f"{tuple(position.shape)}"
            )
        if position.device != q.device:
            raise ValueError(f"{_OP}: position: expected a tensor on q's device {q.device}, got {position.device}")
        return position, 0
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"{_OP}: position: expected an int or a 0-dim int64 tensor, got {type(position).__name__}")
    if not 0 <= position <= lmax - n:
        raise ValueError(
            f"{_OP}: position: expected 0 <= position and position + n <= Lmax (n = {n} queries, Lmax = {lmax}), "
            f"got {position}"
        )
    return None, position


def _reasons(q: torch.Tensor):
    head_dim = q.shape[-1]

    def reasons(backend: str) -> list[str]:
        if backend == "eager":
            return []
        why = list(backend_reasons(_OP, backend, q.device))
        if head_dim not in HEAD_DIMS:
            why.append(f"the kernels take head sizes {HEAD_DIMS}, got {head_dim}")
        if q.dtype not in KERNEL_DTYPES:
            why.append(f"the kernels take float16, bfloat16 and float32, got {q.dtype}")
        return why

    return reasons


def bind_decode_attention(q, k_cache, v_cache, *, kind, text_len, grid_size, kernel=11, conv_variant="clipped",
                          scale=None, backend=None):  # fmt: skip
    """`f(q, k_cache, v_cache, position)`: sparse_decode_attention with everything but the tensors and the
    position checked and resolved once, here, for calls like this one (same shapes, dtypes, device, mask and
    backend). For a decoding loop, whose steps differ only in the values: the per-call checks and the
    backend choice cost more than one step of the kernel at small sizes. The kernels still check what they
    read (shapes, an int position's range); a tensor position is checked like the op's."""
    grid_h, grid_w = _grid(grid_size)
    masks.check_mask_args(kind, text_len, grid_h, grid_w, kernel, conv_variant, _OP)
    _check_tensors(q, k_cache, v_cache, text_len, grid_h, grid_w)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{_OP}: scale: expected a finite float, got {scale!r}")
    chosen = select(_OP, q.device, backend, _reasons(q))
    lmax = k_cache.shape[2]
    if chosen == "eager":
        kw = {"kind": kind, "text_len": text_len, "grid_size": (grid_h, grid_w), "kernel": kernel,
              "conv_variant": conv_variant, "scale": scale}  # fmt: skip

        def call_eager(q, k_cache, v_cache, position):
            pt, pi = _check_position(position, q, lmax)
            if pt is not None:  # the reference takes an int: read the tensor, and check its value
                pi = int(pt.item())
                _check_position(pi, q, lmax)
            return _ref.sparse_decode_attention(q, k_cache, v_cache, position=pi, **kw)

        return call_eager
    fn = _triton_op if chosen == "triton" else torch.ops.dalle_fast.sparse_decode_attention.default
    static = (masks.KINDS.index(kind), text_len, grid_h, grid_w, kernel, conv_variant == "torus", float(scale))

    def call(q, k_cache, v_cache, position):
        pt, pi = _check_position(position, q, lmax)
        return fn(q, k_cache, v_cache, pt, pi, *static)

    return call


def available_backends(q, device=None) -> list[str]:
    """The backends that can serve sparse_decode_attention, in BACKENDS order: for queries like the tensor q, or
    (as dalle_fast.ops.available_backends("sparse_decode_attention", device) asks) on `device` for the kernels'
    head sizes and dtypes, which every kernel backend serves alike."""
    from .._dispatch import BACKENDS

    if not isinstance(q, torch.Tensor):  # (op name, device)
        dev = torch.device(device)
        return [b for b in BACKENDS if b == "eager" or not backend_reasons(_OP, b, dev)]
    r = _reasons(q)
    return [b for b in BACKENDS if not r(b)]


def sparse_decode_attention(
    q, k_cache, v_cache, *, kind, position, text_len, grid_size, kernel=11, conv_variant="clipped", scale=None,
    backend=None,
):  # fmt: skip
    """Attention of the queries at raster positions position .. position + n - 1 to a KV cache, reading only the
    keys the DALL-E mask of `kind` allows (the row of ops.sparse_attention at those positions).

    q: [B, H, n, D] (n >= 1, small); k_cache, v_cache: [B, H, Lmax, D] with position + n <= Lmax <= text_len +
    grid_h * grid_w, any strides (a [B, Lmax, H, D] cache passed transposed is read in place when its last
    stride is 1); cache rows past position + n - 1 are never read. position: an int, or a 0-dim int64 tensor on
    q's device (the GPU kernels read it from memory, so a CUDA graph can replay the step after updating it in
    place). grid_size: grid_h or (grid_h, grid_w); kind "full", "row", "column" or "conv" (kernel odd,
    conv_variant "clipped" or "torus"); scale defaults to D ** -0.5. Returns [B, H, n, D] in q's dtype (memory
    [B, n, H, D]; fp32 math). D in {32, 64, 128} and fp16 / bf16 / fp32 for the kernel backends. Not
    differentiable.
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError(
            f"{_OP}: an input requires grad, but decoding attention has no backward (inference only): call it "
            "under torch.no_grad() / torch.inference_mode(), or detach the inputs"
        )
    bound = bind_decode_attention(q, k_cache, v_cache, kind=kind, text_len=text_len, grid_size=grid_size,
                                  kernel=kernel, conv_variant=conv_variant, scale=scale, backend=backend)  # fmt: skip
    return bound(q, k_cache, v_cache, position)
