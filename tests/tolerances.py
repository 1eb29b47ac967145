"""The parity tolerances of DESIGN section 8, written once for every test."""

import torch

# (rtol, atol) for elementwise results and short reductions, by the dtype of the result under test.
ELEMENTWISE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compare in fp64 with the tolerance of `dtype` (default: actual's dtype); `scale` widens atol for
    results whose magnitude is scaled (e.g. gradients multiplied by 1/tau)."""
    rtol, atol = ELEMENTWISE[dtype or actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol * scale)
