"""Backend selection (DESIGN section 2).

Every public op takes `backend=None | "triton" | "cuda" | "cpp" | "eager"`. Precedence: the `backend=`
argument, then the innermost `use_backend` context, then the environment variable DALLE_FAST_BACKEND, then
the automatic choice: the first backend of the op's preference list for the device that can serve the call.
A named backend that cannot serve raises BackendUnavailable listing why; there is never a silent fallback.

Each op states, per backend, why that backend cannot serve a call (the xformers `not_supported_reasons`
pattern): an empty list means it can.
"""

import contextlib
import contextvars
import os
from collections.abc import Callable, Sequence

import torch

from . import _extension

BACKENDS = ("triton", "cuda", "cpp", "eager")
ENV_VAR = "DALLE_FAST_BACKEND"

_context: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("dalle_fast_backend", default=())


class BackendUnavailable(RuntimeError):
    """A named backend cannot serve a call; the message lists the reasons."""


def _check_name(name, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: expected one of {', '.join(map(repr, BACKENDS))} or None, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block, ops called without `backend=` use `name` (None: automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    token = _context.set(_context.get() + (name,))
    try:
        yield
    finally:
        _context.reset(token)


def requested_backend(backend: str | None) -> tuple[str | None, str]:
    """The backend asked for, and where the request came from (for error messages)."""
    if backend is not None:
        return _check_name(backend, "backend"), "the backend= argument"
    stack = _context.get()
    if stack:
        return stack[-1], "the use_backend() context"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"the environment variable {ENV_VAR}"), f"{ENV_VAR}={env}"
    return None, "automatic choice"


# Reasons common to all ops -------------------------------------------------------------------------------


def _triton_reasons(device: torch.device) -> list[str]:
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError as e:
        reasons.append(f"triton is not importable ({e})")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            reasons.append("triton runs on CPU tensors only under TRITON_INTERPRET=1 (tests)")
    elif device.type != "cuda":
        reasons.append(f"triton kernels need a CUDA device, got {device.type}")
    return reasons


def _extension_reasons(op: str, device: torch.device, backend: str) -> list[str]:
    want = {"cuda": "cuda", "cpp": "cpu"}[backend]
    if device.type != want:
        return [f"the {backend} backend serves {want} tensors, got {device.type}"]
    if _extension.load() is None:
        return [_extension.load_error]
    key = "CUDA" if backend == "cuda" else "CPU"
    if not _extension.has_kernel(op, key):
        why = " (the extension was built without its CUDA sources)" if key == "CUDA" else ""
        return [f"dalle_fast._C has no {key} kernel for dalle_fast::{op}{why}"]
    return []


def backend_reasons(op: str, backend: str, device: torch.device) -> list[str]:
    """Why `backend` cannot serve the extension op dalle_fast::`op` on `device` (empty: it can)."""
    if backend == "eager":
        return []
    if backend == "triton":
        return _triton_reasons(device)
    return _extension_reasons(op, device, backend)


# Selection -----------------------------------------------------------------------------------------------


def preference(device: torch.device) -> Sequence[str]:
    """Automatic order per device. GPU: cuda before triton until a GPU benchmark says otherwise."""
    if device.type == "cuda":
        return ("cuda", "triton", "eager")
    return ("cpp", "eager")


def select(
    op_name: str,
    device: torch.device,
    backend: str | None,
    reasons: Callable[[str], list[str]],
) -> str:
    """Pick the backend for one call of `op_name`. `reasons(b)` lists why b cannot serve this call."""
    name, source = requested_backend(backend)
    if name is not None:
        why = reasons(name)
        if why:
            raise BackendUnavailable(
                f"{op_name}: backend {name!r} (from {source}) cannot serve this call on {device}: " + "; ".join(why)
            )
        return name
    tried = []
    for b in preference(device):
        why = reasons(b)
        if not why:
            return b
        tried.append(f"{b}: {'; '.join(why)}")
    raise BackendUnavailable(f"{op_name}: no backend can serve this call on {device}: " + " | ".join(tried))


def registered_ops(names: Sequence[str], backend: str) -> dict[str, object]:
    """The registered op behind each of `names` for a kernel backend (for opcheck and tests): the C++ schema
    dalle_fast::<name> for cpp and cuda, the custom op dalle_fast::triton_<name> for triton."""
    if backend in ("cpp", "cuda"):
        return {n: getattr(torch.ops.dalle_fast, n) for n in names}
    if backend == "triton":
        return {n: getattr(torch.ops.dalle_fast, f"triton_{n}") for n in names}
    raise ValueError(f"backend: expected 'cpp', 'cuda' or 'triton', got {backend!r}")
