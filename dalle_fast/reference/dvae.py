"""Eager oracles of the dVAE's fused ops (paper section 2.1, App. A.3): fp32 math (fp64 for fp64 input).

gumbel_quantize        the decoder's codebook 1x1 convolution of the Gumbel-softmax relaxation of the logits
logit_laplace_nll      the negative log of the logit-Laplace density of mapped pixels
categorical_kl_uniform the KL divergence of softmax(logits) from the uniform distribution over the codes

All three are differentiable by torch autograd.
"""

import math

import torch

from .gumbel import gumbel_softmax

_REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def gumbel_quantize(
    logits: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tau: float,
    hard: bool,
    seed: int,
    offset: int = 0,
) -> torch.Tensor:
    """conv1x1(gumbel_softmax(logits, tau, hard, dim=1, seed, offset), weight, bias).

    logits [B, K, *spatial] (codes on dim 1), weight [C, K] or [C, K, 1, 1] (the decoder's codebook
    convolution), bias [C] or None -> [B, C, *spatial]:
        y[b, :, s] = softmax((logits[b, :, s] + g[b, :, s]) / tau)   (one-hot of the argmax if hard)
        out[b, c, s] = sum_k weight[c, k] y[b, k, s] + bias[c]
    with g the Gumbel noise of element (b, k, s) of the logits (DESIGN section 3). The result has the dtype of
    `logits`.
    """
    cd = _compute_dtype(logits, weight)
    y = gumbel_softmax(logits.to(cd), tau, hard, 1, seed, offset)
    w = weight.reshape(weight.shape[0], weight.shape[1]).to(cd)
    out = torch.einsum("bk...,ck->bc...", y, w)
    if bias is not None:
        out = out + bias.to(cd).reshape((1, -1) + (1,) * (logits.dim() - 2))
    return out.to(logits.dtype)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-ln f(x | mu, b) for x in (0, 1), with b = exp(log_b), elementwise, then reduced.

    The logit-Laplace density (paper App. A.3, Eq. 2) is the law of sigmoid(y) for y ~ Laplace(mu, b):
        f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b),
    (the Laplace density at logit(x) times d logit(x)/dx = 1 / (x (1 - x))), so
        -ln f = |logit(x) - mu| * exp(-log_b) + log_b + ln x + ln(1 - x) + ln 2.
    The last three terms do not depend on the decoder; they make the value a true NLL in nats.
    reduction: "mean" (over every element: the per-subpixel NLL the paper's loss uses), "sum" or "none".
    Result in the compute dtype (fp32; fp64 if an input is fp64).
    """
    cd = _compute_dtype(x, mu, log_b)
    x, mu, log_b = x.to(cd), mu.to(cd), log_b.to(cd)
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = (logit_x - mu).abs() * torch.exp(-log_b) + log_b + torch.log(x) + torch.log1p(-x) + math.log(2.0)
    return _reduce(nll, reduction)


def categorical_kl_uniform(logits: torch.Tensor, dim: int = 1, reduction: str = "mean") -> torch.Tensor:
    """KL(q || uniform) with q = softmax(logits, dim), over the K = logits.shape[dim] codes:
        KL = sum_k q_k ln q_k + ln K = sum_k q_k (logits_k - logsumexp(logits)) + ln K   (>= 0).
    reduction: "mean" over the remaining positions (the per-code-position KL), "sum", or "none" (the
    shape of logits without `dim`). Result in the compute dtype (fp32; fp64 for fp64 logits).
    """
    cd = _compute_dtype(logits)
    log_q = torch.log_softmax(logits.to(cd), dim=dim)
    kl = (log_q.exp() * log_q).sum(dim) + math.log(logits.shape[dim])
    return _reduce(kl, reduction)
