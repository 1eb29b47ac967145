"""ScaledLinear: a drop-in for torch.nn.Linear on dalle_fast.ops.scaled_linear (DESIGN section 6)."""

import math

import torch
from torch import nn

from .. import ops


class ScaledLinear(nn.Module):
    """y = x @ weight^T + bias with fp32 master parameters and fp16 (or bf16) compute.

    Same constructor, parameter names (`weight` [out, in], `bias` [out]), initialisation and state_dict as
    nn.Linear, so checkpoints load strictly. The input is cast to `compute_dtype` (default float16), the
    weight is rounded to it for the product, the bias is added in fp32 and the output has `compute_dtype`;
    the parameters' gradients come back in fp32.

    Inside a ScaledResidual that names it as its output projection, the layer's output leaves the block as
    fp32 and the block's gradient scale rides on its backward GEMMs (see dalle_fast.amp.ScaledResidual);
    `backend` picks the ops' backend (None: automatic).
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        compute_dtype: torch.dtype = torch.float16,
        backend: str | None = None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype or torch.float32}
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        # Set by ScaledResidual around its forward when this layer is the block's output projection.
        self.exit_grad_scale: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        if self.exit_grad_scale is not None:
            return ops.scaled_linear(
                x,
                self.weight,
                self.bias,
                grad_scale=self.exit_grad_scale,
                out_dtype=torch.float32,
                backend=self.backend,
            )
        return ops.scaled_linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )
