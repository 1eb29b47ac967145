"""Eager PyTorch oracles: fp32 math, no imports from the rest of dalle_fast."""

from .gumbel import gumbel_argmax, gumbel_softmax
from .masks import dense_mask, sparse_attention
from .philox import gumbel_noise, philox_uint32, uniform_from_uint32

__all__ = [
    "dense_mask",
    "gumbel_argmax",
    "gumbel_noise",
    "gumbel_softmax",
    "philox_uint32",
    "sparse_attention",
    "uniform_from_uint32",
]

# The dVAE's losses and quantizer (issue 5).
from .dvae import categorical_kl_uniform, gumbel_quantize, logit_laplace_nll  # noqa: E402

__all__ += ["categorical_kl_uniform", "gumbel_quantize", "logit_laplace_nll"]

# Scaled matmul family (issue 4, DESIGN section 6).
from .matmul import scale_filter, scaled_matmul  # noqa: E402

__all__ += ["scale_filter", "scaled_matmul"]

# Fused sampling (issue 7).
from .sample import sample  # noqa: E402

__all__ += ["sample"]
