"""Drop-in modules; they call dalle_fast.ops only, never launch kernels themselves."""

__all__: list[str] = []

# The discrete VAE (issue 5).
from .dvae import (  # noqa: E402
    Decoder,
    DecoderBlock,
    DiscreteVAE,
    DVAEOutput,
    Encoder,
    EncoderBlock,
    map_pixels,
    unmap_pixels,
)
from .dvae_loader import UnsafePickleError, load_openai_dvae, load_openai_module  # noqa: E402

__all__ += [
    "DVAEOutput",
    "Decoder",
    "DecoderBlock",
    "DiscreteVAE",
    "Encoder",
    "EncoderBlock",
    "UnsafePickleError",
    "load_openai_dvae",
    "load_openai_module",
    "map_pixels",
    "unmap_pixels",
]

# The scaled fp16 linear layer (issue 4).
from .linear import ScaledLinear  # noqa: E402

__all__ += ["ScaledLinear"]

# The DALL-E transformer (issue 6).
from .dalle import DALLE, DALLEConfig, DALLELoss  # noqa: E402

__all__ += ["DALLE", "DALLEConfig", "DALLELoss"]
