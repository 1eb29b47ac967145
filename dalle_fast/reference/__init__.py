"""Eager PyTorch oracles: fp32 math, no imports from the rest of dalle_fast."""

from .gumbel import gumbel_argmax, gumbel_softmax
from .philox import gumbel_noise, philox_uint32, uniform_from_uint32

__all__ = ["gumbel_argmax", "gumbel_noise", "gumbel_softmax", "philox_uint32", "uniform_from_uint32"]
