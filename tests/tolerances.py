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


def assert_within_eager_error(actual: torch.Tensor, oracle: torch.Tensor, eager: torch.Tensor, dtype=None, scale=1.0):
    """DESIGN section 8's rule for long reductions: the error of `actual` against an fp64 `oracle` is at
    most twice the error of eager PyTorch (`eager`, computed in the precision under test), plus a floor
    (the elementwise atol of the dtype, times `scale`)."""
    _, atol = ELEMENTWISE[dtype or actual.dtype]
    oracle = oracle.double().cpu()
    err = (actual.double().cpu() - oracle).abs().max().item() if actual.numel() else 0.0
    eager_err = (eager.double().cpu() - oracle).abs().max().item() if eager.numel() else 0.0
    bound = 2 * eager_err + atol * scale
    assert err <= bound, f"max error {err:.3g} > 2 x eager's {eager_err:.3g} + floor {atol * scale:.3g}"
