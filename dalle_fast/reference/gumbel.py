"""Eager oracles of the Gumbel-softmax family, fp32 math (fp64 when the input is fp64)."""

import torch

from .philox import gumbel_noise


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, dim: int, seed: int, offset: int = 0) -> torch.Tensor:
    """softmax((logits + g) / tau, dim); hard: one-hot of the argmax forward, soft gradient backward.

    Differentiable by torch autograd; the result has the dtype of `logits`.
    """
    cd = _compute_dtype(logits)
    z = logits.to(cd) + gumbel_noise(logits.shape, seed, offset, device=logits.device, dtype=cd)
    y = torch.softmax(z / tau, dim=dim)
    if hard:
        index = z.argmax(dim, keepdim=True)  # the argmax of the scores, not of their rounded softmax
        y_hard = torch.zeros_like(y).scatter_(dim, index, 1.0)
        y = y_hard - y.detach() + y
    return y.to(logits.dtype)


def gumbel_argmax(logits: torch.Tensor, dim: int, seed: int, offset: int = 0) -> torch.Tensor:
    """argmax(logits + g, dim): a sample of softmax(logits) along dim (Gumbel-max), int64."""
    cd = _compute_dtype(logits)
    g = gumbel_noise(logits.shape, seed, offset, device=logits.device, dtype=cd)
    return torch.argmax(logits.to(cd) + g, dim=dim)
