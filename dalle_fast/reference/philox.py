"""Philox4x32-10 and the Gumbel noise map in plain int64 torch arithmetic: the oracle of DESIGN section 3.

Element number n = offset + i (i = row-major index in the logical shape) takes output lane n % 4 of
Philox4x32-10 keyed by (seed & 0xffffffff, seed >> 32) at counter (n // 4 & 0xffffffff, n // 4 >> 32, 0, 0),
which is ``triton.language.randint4x(seed, n // 4)[n % 4]``.

uint32 -> uniform: ``triton.language.uint_to_uniform_float``: reinterpret as int32, map negative x to ~x,
multiply by 4.6566127342e-10 in fp32. The result lies in [0, 1 - 2**-24].

uniform -> Gumbel, guarded so that nothing infinite or NaN can come out, whatever the log's accuracy::

    t = max(-log(max(u, 2**-32)), 2**-24)
    g = -log(t)                      # g in [-3.0993, 16.6355]

Every 32x32-bit product is split into 16-bit halves so that no int64 product overflows.
"""

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UINT_TO_UNIFORM_SCALE = 4.6566127342e-10
GUMBEL_U_MIN = 2.0**-32
GUMBEL_T_MIN = 2.0**-24
MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for int64 tensors a and a constant b, both in [0, 2**32)."""
    lo_part = a * (b & 0xFFFF)  # < 2**48
    hi_part = a * (b >> 16)  # < 2**48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = ((hi_part & 0xFFFF) << 16) + lo_part
    return high & MASK32, low & MASK32


def philox4x32_10(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """The four uint32 outputs (as int64 tensors) of Philox4x32-10 at 64-bit counters `counter`."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed}")
    counter = counter.to(torch.int64)
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_uint32(n: torch.Tensor, seed: int) -> torch.Tensor:
    """uint32 (as int64) of the element numbers n (non-negative int64)."""
    lanes = philox4x32_10(n >> 2, seed)
    out = torch.stack(lanes, dim=-1)
    return torch.gather(out, -1, (n & 3).unsqueeze(-1)).squeeze(-1)


def uniform_from_uint32(bits: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float: fp32 values in [0, 1 - 2**-24]."""
    x = torch.where(bits >= 2**31, MASK32 - bits, bits)  # int32 bitcast, then ~x for negatives
    return x.to(torch.float32) * torch.tensor(UINT_TO_UNIFORM_SCALE, dtype=torch.float32)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Guarded -log(-log(u)) in the dtype of u."""
    t = torch.clamp_min(-torch.log(torch.clamp_min(u, GUMBEL_U_MIN)), GUMBEL_T_MIN)
    return -torch.log(t)


def element_numbers(shape, offset: int, device=None) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= int(s)
    if offset < 0 or offset + numel > 2**64:
        raise ValueError(f"offset: expected offset >= 0 and offset + numel <= 2**64, got offset={offset}")
    if offset + numel >= 2**63:
        raise ValueError("offset: the eager reference needs offset + numel < 2**63")
    return (torch.arange(numel, dtype=torch.int64, device=device) + offset).reshape(tuple(shape))


def gumbel_noise(shape, seed: int, offset: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """The Gumbel noise of DESIGN section 3 for a tensor of logical shape `shape`.

    The uniform is always formed in fp32 (as every backend does); with dtype=torch.float64 the two
    logs run in fp64, which makes an oracle for the fp32 kernels.
    """
    u = uniform_from_uint32(philox_uint32(element_numbers(shape, offset, device), seed))
    return gumbel_from_uniform(u.to(torch.float64 if dtype == torch.float64 else torch.float32)).to(dtype)
