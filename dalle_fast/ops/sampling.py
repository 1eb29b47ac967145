"""ops.sample: temperature, top-k, top-p and Gumbel-max sampling in one kernel (issue 7), on the random stream
of DESIGN section 3.

How one call travels (the layering of dalle_fast.ops.gumbel): the public function validates its arguments,
decides the seed (seed=None draws one here), picks a backend and calls that backend's registered op:
    cpp / cuda  torch.ops.dalle_fast.sample          schema csrc/ops.cpp, kernels csrc/{cpu/sample.cpp,cuda/sample.cu}
    triton      torch.ops.dalle_fast.triton_sample   torch.library.custom_op around dalle_fast.ops._triton_sample
    eager       dalle_fast.reference.sample          plain torch: topk, sort, softmax, cumsum, argmax
The registered ops take top_k = 0 for "no top-k" and top_p = 1.0 for "no top-p", and return -1 for an invalid
row (a NaN or +inf in logits / temperature, or a row of only -inf): they never raise on the data, so they need
no host synchronisation and can be captured in a CUDA graph. The wrapper turns a -1 into an error on CPU
tensors (where the check costs nothing); on GPU it does not look (that would be a sync per decoding step):
the caller gets -1, which any embedding lookup rejects.
"""

import math
import numbers

import torch

from .. import _dispatch, _extension, reference
from .gumbel import _check_offset, _check_seed, _signed

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OPS = ("sample",)


def _sample_fake(logits, temperature, top_k, top_p, seed, offset):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


if _extension.load() is not None:  # otherwise the schema does not exist; the dispatcher reports load_error
    torch.library.register_fake("dalle_fast::sample")(_sample_fake)


@torch.library.custom_op("dalle_fast::triton_sample", mutates_args=())
def _triton_sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, offset: int
) -> torch.Tensor:
    from . import _triton_sample as launchers  # triton is imported on first use, not at package import

    return launchers.sample(logits, temperature, top_k, top_p, seed, offset)


torch.library.register_fake("dalle_fast::triton_sample")(_sample_fake)


def registered_ops(backend: str) -> dict[str, object]:
    """The registered op behind each name for a kernel backend (for opcheck and tests)."""
    return _dispatch.registered_ops(OPS, backend)


def available_backends(op_name: str, device) -> list[str]:
    """Backends that can serve "sample" on `device`."""
    if op_name != "sample":
        raise ValueError(f"op_name: expected 'sample', got {op_name!r}")
    device = torch.device(device)
    return [b for b in _dispatch.BACKENDS if not _dispatch.backend_reasons("sample", b, device)]


# Validation ----------------------------------------------------------------------------------------------


def _check_args(logits, temperature, top_k, top_p, seed):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"logits: expected float16, bfloat16 or float32, got {logits.dtype}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits: expected at least 1 dim and a non-empty last dim (categories), got {tuple(logits.shape)}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"top_k: expected None or an int >= 1, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k: expected None or an int >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p: expected None or a number in (0, 1], got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.device.type != "cpu" or seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype == torch.bool:
            raise ValueError(
                "seed: a tensor seed must be one integer on the CPU (its value is read on the host), "
                f"got {seed.dtype} of shape {tuple(seed.shape)} on {seed.device}"
            )
        seed = int(seed.item())
    return _check_seed(seed)


def _invalid_rows_error(logits: torch.Tensor, temperature: float, out: torch.Tensor) -> ValueError:
    rows = (out < 0).nonzero()
    first = tuple(int(i) for i in rows[0]) if rows.numel() else ()
    z = logits[first].float() / temperature
    if torch.isnan(z).any():
        why = "NaN"
    elif torch.isposinf(z).any():
        why = "+inf (in logits / temperature)"
    else:
        why = "only -inf entries (nothing to sample)"
    return ValueError(f"logits: expected no NaN or +inf and at least one finite entry per row; row {first} has {why}")


# Public API ----------------------------------------------------------------------------------------------


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, seed=None, offset=0, backend=None):
    """One category per row of the last dim of `logits`: int64 [*logits.shape[:-1]].

    logits: float32, float16 or bfloat16, any leading shape, categories on the last dim; -inf marks an
    entry that cannot be drawn. Semantics (the eager backend implements them literally):
      - z = logits.float() / temperature (fp32; temperature finite > 0).
      - top_k (int >= 1 or None): keep the entries whose z >= the k-th largest z of the row (ties at the
        threshold are kept); top_k >= V keeps all.
      - top_p (float in (0, 1] or None), after top_k: with the probabilities of the kept entries (softmax over
        them), keep the smallest set of the largest ones whose total is >= top_p, as a value threshold
        (entries equal to the smallest kept value are kept too); at least one entry is always kept.
      - then Gumbel-max over the kept entries: argmax of z + g (first index on ties), g the Gumbel noise of
        element number offset + i, i the row-major index in logits' logical shape: exactly the noise of
        gumbel_argmax, so sample(x, temperature=t, seed=s) == gumbel_argmax(x.float() / t, seed=s).
    seed=None draws a seed in [0, 2**63) from torch's default CPU generator here; a seed may also be a
    one-element integer CPU tensor. The op advances nothing: callers pass a fresh `offset` per call (e.g.
    offset += logits.numel()).
    Errors: a NaN, a +inf in logits / temperature, or a row of only -inf raise ValueError for CPU tensors;
    for GPU tensors the row's result is -1 instead (no host synchronisation, so the call can sit in a CUDA
    graph).
    Kernels find the thresholds without a sort (a bit-by-bit search over the order-preserving integer keys
    of z: 32 counts for top-k, 32 masked sums for top-p), then take the masked Gumbel-max in the same pass.
    Equal ids on every backend for the same seed and offset; for top-p, up to the rounding of the mass sums,
    i.e. unless the cumulative mass at the boundary lies within float rounding of top_p.
    """
    seed = _check_args(logits, temperature, top_k, top_p, seed)
    offset = _check_offset(offset, logits.numel())
    V = logits.shape[-1]
    k = 0 if top_k is None or top_k >= V else int(top_k)
    p = 1.0 if top_p is None else float(top_p)
    temperature = float(temperature)
    device = logits.device

    def reasons(b: str) -> list[str]:
        return _dispatch.backend_reasons("sample", b, device)

    name = _dispatch.select("sample", device, backend, reasons)
    if name == "eager":
        out = reference.sample(logits, temperature, k or None, p if p < 1 else None, seed, offset)
    else:
        out = registered_ops(name)["sample"](logits, temperature, k, p, _signed(seed), offset)
    if device.type == "cpu" and out.numel() and bool((out < 0).any()):
        raise _invalid_rows_error(logits, temperature, out)
    return out
