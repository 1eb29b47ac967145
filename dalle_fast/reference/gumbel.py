"""Eager oracles of the Gumbel-softmax family, fp32 math (fp64 when the input is fp64)."""

import torch

from .philox import gumbel_noise


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _StraightThrough(torch.autograd.Function):
    """Forward: the exact one-hot; backward: the gradient goes to the soft sample unchanged.

    (torch's y_hard - y_soft.detach() + y_soft is a one-hot only up to rounding, and NaN wherever y_soft
    is: the kernels write the exact one-hot, with the first NaN as the argmax, as torch.argmax does.)
    """

    @staticmethod
    def forward(y_hard, y_soft):
        return y_hard

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, dim: int, seed: int, offset: int = 0) -> torch.Tensor:
    """softmax((logits + g) / tau, dim); hard: one-hot of the argmax forward, soft gradient backward.

    Differentiable by torch autograd; the result has the dtype of `logits`.
    """
    cd = _compute_dtype(logits)
    z = logits.to(cd) + gumbel_noise(logits.shape, seed, offset, device=logits.device, dtype=cd)
    y = torch.softmax(z / tau, dim=dim)
    if hard:
        index = z.argmax(dim, keepdim=True)  # the argmax of the scores, not of their rounded softmax
        y = _StraightThrough.apply(torch.zeros_like(y).scatter_(dim, index, 1.0), y)
    return y.to(logits.dtype)


def gumbel_argmax(logits: torch.Tensor, dim: int, seed: int, offset: int = 0) -> torch.Tensor:
    """argmax(logits + g, dim): a sample of softmax(logits) along dim (Gumbel-max), int64."""
    cd = _compute_dtype(logits)
    g = gumbel_noise(logits.shape, seed, offset, device=logits.device, dtype=cd)
    return torch.argmax(logits.to(cd) + g, dim=dim)
