"""Eager oracle of dalle_fast.ops.sample: temperature, top-k, top-p, then Gumbel-max on the stream of
DESIGN section 3, written literally (sort, softmax, cumsum) in fp32."""

import torch

from .philox import gumbel_noise


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, seed: int, offset: int = 0
) -> torch.Tensor:
    """int64 [*logits.shape[:-1]]: one category per row of the last dim; -1 for an invalid row (a NaN or +inf
    in logits / temperature, or every entry -inf). Arguments are assumed valid (the public wrapper checks)."""
    z = logits.float() / temperature
    bad = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | (z == float("-inf")).all(-1)
    z = torch.where(bad.unsqueeze(-1), torch.zeros_like(z), z)
    V = z.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    if top_k is not None and top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]  # the k-th largest value, ties counted
        z = torch.where(z >= kth, z, neg_inf)
    if top_p is not None and top_p < 1:
        desc = torch.sort(z, dim=-1, descending=True).values
        cum = torch.cumsum(torch.softmax(desc, dim=-1), dim=-1)
        # The smallest prefix of the sorted probabilities whose total is >= top_p; its last value is the
        # threshold (every entry equal to it is kept). Rounding can leave the total below a top_p near 1:
        # then everything kept so far stays.
        last = (cum < top_p).sum(-1, keepdim=True).clamp(max=V - 1)
        thr = torch.gather(desc, -1, last)
        z = torch.where(z >= thr, z, neg_inf)
    g = gumbel_noise(logits.shape, seed, offset, device=logits.device, dtype=torch.float32)
    out = torch.argmax(z + g, dim=-1)
    return torch.where(bad, torch.full_like(out, -1), out)
