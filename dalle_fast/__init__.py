"""dalle_fast: DALL-E v1 (discrete VAE and sparse transformer) on fused kernels of its own.

Backends per op: triton (GPU), cuda (CUDA C++), cpp (C++ CPU) and eager (the PyTorch reference); see
dalle_fast.ops. `dalle_fast.extension_error` says why the compiled extension is missing, if it is.
"""

from . import _extension
from ._dispatch import BACKENDS, BackendUnavailable, use_backend

__version__ = "0.1.0"

_extension.load()
extension_error: str | None = _extension.load_error

from . import masks, ops  # noqa: E402  (ops registers the fakes and autograd)

__all__ = ["BACKENDS", "BackendUnavailable", "extension_error", "masks", "ops", "use_backend", "__version__"]
