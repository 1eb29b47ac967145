"""Loads dalle_fast._C and remembers why it could not be loaded: a missing extension is never silent."""

import importlib

import torch

_C = None
load_error: str | None = None


def load():
    """Import the compiled extension once; on failure keep the reason in `load_error`."""
    global _C, load_error
    if _C is not None or load_error is not None:
        return _C
    try:  # torch is imported first: the library registers into its dispatcher
        _C = importlib.import_module("dalle_fast._C")
    except ImportError as e:  # not built, or built against another torch
        load_error = (
            f"dalle_fast._C could not be imported ({type(e).__name__}: {e}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    return _C


_kernels: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result  # registration does not change while a graph runs
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered an implementation of dalle_fast::<op> for a dispatch key. Remembered
    per (op, key): the extension registers everything when it is imported, and asking the dispatcher costs
    ~25 us, more than a decoding step's small ops themselves."""
    if load() is None:
        return False
    found = _kernels.get((op, dispatch_key))
    if found is None:
        found = _kernels[(op, dispatch_key)] = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"dalle_fast::{op}", dispatch_key
        )
    return found
