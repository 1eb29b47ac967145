"""Drop-in modules on dalle_fast.ops (they never launch kernels themselves)."""

from .linear import ScaledLinear

__all__ = ["ScaledLinear"]
