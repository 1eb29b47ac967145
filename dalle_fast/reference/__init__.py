"""Eager PyTorch oracles: fp32 math, no imports from the rest of dalle_fast."""

from .gumbel import gumbel_argmax, gumbel_softmax
from .philox import gumbel_noise, philox_uint32, uniform_from_uint32

__all__ = ["gumbel_argmax", "gumbel_noise", "gumbel_softmax", "philox_uint32", "uniform_from_uint32"]

# Scaled matmul family (DESIGN section 6).
from .matmul import scale_filter, scaled_matmul  # noqa: E402

__all__ += ["scale_filter", "scaled_matmul"]
