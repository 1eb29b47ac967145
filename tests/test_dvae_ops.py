"""Parity of every backend of the dVAE's fused ops (gumbel_quantize, logit_laplace_nll, categorical_kl_uniform)
with the eager reference, and their contract: saved tensors, registration, compile, bad input.

Sizes are tiny: Triton runs in its interpreter here (the whole file well under a minute)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import assert_close, assert_within_eager_error

import dalle_fast
from dalle_fast import ops, reference
from dalle_fast.ops.dvae import registered_ops

device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)

# (B, K, spatial, C): K not a power of two, odd H*W, K past one 64-code chunk, no spatial dims, 1-D spatial.
QCASES = [
    (2, 37, (3, 5), 11),
    (1, 70, (4, 4), 20),
    (3, 5, (1, 7), 3),
    (4, 33, (), 9),
    (2, 16, (9,), 130),  # C past one 128-channel block
]
SEEDS = [0, 2**63 + 5]


@pytest.fixture(autouse=True)
def _exact_fp32_products():
    """fp32 parity: the Triton codebook products follow cudnn.allow_tf32 (on by default), like F.conv2d."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _qinputs(B, K, spatial, C, device, dtype=torch.float32, bias=True):
    x = (torch.randn(B, K, *spatial, device=device) * 2).to(dtype).requires_grad_(True)
    w = (torch.randn(C, K, 1, 1, device=device) / K**0.5).requires_grad_(True)
    b = torch.randn(C, device=device).requires_grad_(True) if bias else None
    g = torch.randn(B, C, *spatial, device=device)
    return x, w, b, g


def _grads(out, inputs, g):
    want = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, want, g.to(out.dtype))
    return list(got)


def _quantize_all(x, w, b, g, backend, **kw):
    out = ops.gumbel_quantize(x, w, b, backend=backend, **kw)
    return [out] + _grads(out, (x, w, b), g)


def _oracle(x, w, b, g, **kw):
    """fp64 oracle and the fp32 (or low-precision) eager reference, forward and gradients."""
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    bd = None if b is None else b.detach().double().requires_grad_(True)
    o = reference.gumbel_quantize(xd, wd, bd, **kw)
    oracle = [o] + _grads(o, (xd, wd, bd), g.double())
    xe, we = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    be = None if b is None else b.detach().clone().requires_grad_(True)
    e = reference.gumbel_quantize(xe, we, be, **kw)
    eager = [e] + _grads(e, (xe, we, be), g)
    return oracle, eager


def _check_quantize(got, oracle, eager, dtype, scale=10.0):
    for name, a, o, e in zip(("out", "d logits", "d weight", "d bias"), got, oracle, eager, strict=True):
        assert a.shape == o.shape, name
        try:
            assert_within_eager_error(a, o, e, dtype=dtype, scale=scale)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


# gumbel_quantize -----------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("B,K,spatial,C", QCASES)
@pytest.mark.parametrize("hard", [False, True])
def test_quantize_parity(device, backend, B, K, spatial, C, hard):
    x, w, b, g = _qinputs(B, K, spatial, C, device)
    kw = dict(tau=0.7, hard=hard, seed=12345, offset=3)
    got = _quantize_all(x, w, b, g, backend, **kw)
    assert got[0].dtype == x.dtype and got[0].shape == (B, C, *spatial)
    _check_quantize(got, *_oracle(x, w, b, g, **kw), torch.float32)


@device_backends
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 1, 2**33 + 2])
def test_quantize_equals_unfused_composition(device, backend, seed, offset):
    """Same noise stream as gumbel_softmax: the fused op equals gumbel_softmax + conv1x1 (no bias)."""
    x, w, _, g = _qinputs(2, 24, (3, 4), 6, device, bias=False)
    got = _quantize_all(x, w, None, g, backend, tau=0.5, hard=False, seed=seed, offset=offset)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    z = ops.gumbel_softmax(x2, 0.5, False, 1, seed=seed, offset=offset, backend="eager")
    out = F.conv2d(z, w2)
    ref = [out] + _grads(out, (x2, w2), g)
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True])
def test_quantize_low_precision(device, backend, dtype, hard):
    x, w, b, g = _qinputs(2, 37, (3, 5), 11, device, dtype=dtype)
    kw = dict(tau=1.0, hard=hard, seed=7, offset=0)
    got = _quantize_all(x, w, b, g, backend, **kw)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    oracle, eager = _oracle(x, w, b, g, **kw)
    # tf32 codebook products on GPU for low-precision logits: allow a few units of the dtype's last place.
    _check_quantize(got, oracle, eager, dtype, scale=4.0)


@device_backends
@pytest.mark.parametrize("hard", [False, True])
def test_quantize_noncontiguous(device, backend, hard):
    B, K, H, W, C = 2, 19, 3, 5, 7
    x = (torch.randn(B, H, W, K, device=device) * 2).permute(0, 3, 1, 2).requires_grad_(True)  # channels last
    w = (torch.randn(K, C, device=device) / K**0.5).t().requires_grad_(True)  # [C, K] transposed storage
    b = torch.randn(2 * C, device=device)[::2].requires_grad_(True)
    g = torch.randn(B, W, H, C, device=device).permute(0, 3, 2, 1)
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous() and not g.is_contiguous()
    kw = dict(tau=0.8, hard=hard, seed=1, offset=4)
    got = _quantize_all(x, w, b, g, backend, **kw)
    _check_quantize(got, *_oracle(x, w, b, g, **kw), torch.float32)


@device_backends
def test_quantize_hard_is_a_codebook_column_with_soft_gradient(device, backend):
    x, w, b, g = _qinputs(2, 29, (2, 3), 5, device)
    out = ops.gumbel_quantize(x, w, b, tau=0.5, hard=True, seed=3, backend=backend)
    idx = ops.gumbel_argmax(x.detach(), 1, seed=3, backend="eager")
    expect = w.detach()[:, :, 0, 0][:, idx].permute(1, 0, 2, 3) + b.detach()[None, :, None, None]
    assert torch.equal(out.detach(), expect)
    # The logits gradient is the soft one: that of hard=False with the same noise.
    (dx_hard,) = torch.autograd.grad(out, x, g)
    soft = ops.gumbel_quantize(x, w, b, tau=0.5, hard=False, seed=3, backend=backend)
    (dx_soft,) = torch.autograd.grad(soft, x, g)
    assert_close(dx_hard, dx_soft, scale=10)


@device_backends
def test_quantize_seed_none_and_determinism(device, backend):
    x, w, b, _ = _qinputs(2, 21, (2, 2), 4, device)
    torch.manual_seed(5)
    a = ops.gumbel_quantize(x, w, b, backend=backend)
    torch.manual_seed(5)
    a2 = ops.gumbel_quantize(x, w, b, backend=backend)
    assert torch.equal(a, a2)
    c = ops.gumbel_quantize(x, w, b, seed=11, backend=backend)
    assert torch.equal(c, ops.gumbel_quantize(x, w, b, seed=11, backend=backend))
    assert not torch.equal(c, ops.gumbel_quantize(x, w, b, seed=12, backend=backend))


@kernel_backends
@pytest.mark.parametrize("hard", [False, True])
def test_quantize_saves_no_relaxation(device, backend, hard):
    """Nothing of the size of the [B, K, H, W] relaxed one-hots is saved, beyond the logits themselves."""
    B, K, H, W, C = 2, 64, 4, 4, 8
    x, w, b, g = _qinputs(B, K, (H, W), C, device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.gumbel_quantize(x, w, b, tau=1.0, hard=hard, seed=2, backend=backend)
    big = [t for t in saved if t.numel() >= B * K * H * W and t.data_ptr() != x.data_ptr()]
    assert not big, [tuple(t.shape) for t in big]
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    assert extra <= w.numel() * w.element_size() + B * H * W * (4 + 8), extra
    out.backward(g)


# Losses --------------------------------------------------------------------------------------------------

LOSS_SHAPES = [(2, 3, 5, 7), (4, 1, 3, 3), (1029,)]


def _pixels(shape, device, dtype=torch.float32):
    x = torch.rand(shape, device=device) * 0.8 + 0.1  # mapped pixels in [0.1, 0.9]
    mu = torch.randn(shape, device=device) * 2
    lb = torch.randn(shape, device=device)
    return [t.to(dtype) for t in (x, mu, lb)]


def _loss_and_grads(fn, inputs, reduction, weight=None):
    ts = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ts, reduction)
    w = torch.ones_like(out) if weight is None else weight.to(out)
    return [out] + list(torch.autograd.grad(out, ts, w))


@device_backends
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_parity(device, backend, shape, reduction):
    inputs = _pixels(shape, device)
    w = torch.randn(shape, device=device) if reduction == "none" else None
    got = _loss_and_grads(lambda a, b, c, r: ops.logit_laplace_nll(a, b, c, reduction=r, backend=backend),
                          inputs, reduction, w)  # fmt: skip
    assert got[0].dtype == torch.float32
    oracle = _loss_and_grads(reference.logit_laplace_nll, [t.double() for t in inputs], reduction, w)
    for a, o in zip(got, oracle, strict=True):  # elementwise values and gradients: fp32 rtol
        assert a.shape == o.shape
        assert_close(a, o, dtype=torch.float32, scale=10)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nll_low_precision_and_noncontiguous(device, backend, dtype):
    x, mu, lb = _pixels((3, 6, 5), device)
    x, mu, lb = (t.transpose(0, 2).to(dtype) for t in (x, mu, lb))
    assert not x.is_contiguous()
    got = _loss_and_grads(lambda a, b, c, r: ops.logit_laplace_nll(a, b, c, reduction=r, backend=backend),
                          [x, mu, lb], "mean")  # fmt: skip
    oracle = _loss_and_grads(reference.logit_laplace_nll, [t.double() for t in (x, mu, lb)], "mean")
    assert_close(got[0], oracle[0], dtype=torch.float32)
    for a, o in zip(got[1:], oracle[1:], strict=True):
        assert a.dtype == dtype
        assert_close(a, o, dtype=dtype)


@device_backends
def test_nll_edge_pixels(device, backend):
    """Pixels at 0 and 1 (NaN, as the reference), subnormal and just below 1: the C++ kernel's fast logs
    (eight lanes) refuse them and redo the chunk with exact ones; the others keep fp32 accuracy."""
    x, mu, lb = _pixels((37,), device)
    x = x.clone()
    x[[3, 12, 20, 30]] = torch.tensor([0.0, 1.0, 1e-40, 1 - 2**-24], device=device)
    got = ops.logit_laplace_nll(x, mu, lb, reduction="none", backend=backend)
    ref = reference.logit_laplace_nll(x.double(), mu.double(), lb.double(), "none")
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().sum() == 2
    ok = ~ref.isnan()
    assert_close(got[ok], ref[ok], dtype=torch.float32, scale=10)


@device_backends
def test_nll_broadcasts_like_the_reference(device, backend):
    x = torch.rand(2, 3, 4, 4, device=device) * 0.8 + 0.1
    mu = torch.randn(1, 3, 4, 4, device=device, requires_grad=True)
    lb = torch.randn(3, 1, 1, device=device, requires_grad=True)
    got = ops.logit_laplace_nll(x, mu, lb, reduction="sum", backend=backend)
    gg = torch.autograd.grad(got, (mu, lb))
    ref = reference.logit_laplace_nll(x, mu, lb, "sum")
    rg = torch.autograd.grad(ref, (mu, lb))
    assert_close(got, ref, scale=100)
    for a, e in zip(gg, rg, strict=True):
        assert_close(a, e, scale=10)


KL_CASES = [((2, 37, 3, 5), 1), ((5, 1000), -1), ((3, 70, 4), 1), ((7, 3, 5), 0), ((4, 1), -1)]


@device_backends
@pytest.mark.parametrize("shape,dim", KL_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kl_parity(device, backend, shape, dim, reduction):
    logits = torch.randn(shape, device=device) * 3
    w = None
    if reduction == "none":
        rest = list(shape)
        del rest[dim]
        w = torch.randn(rest, device=device)
    fn = lambda t, r: ops.categorical_kl_uniform(t, dim, reduction=r, backend=backend)  # noqa: E731
    got = _loss_and_grads(fn, [logits], reduction, w)
    oracle = _loss_and_grads(lambda t, r: reference.categorical_kl_uniform(t, dim, r), [logits.double()], reduction, w)
    eager = _loss_and_grads(lambda t, r: reference.categorical_kl_uniform(t, dim, r), [logits], reduction, w)
    assert got[0].dtype == torch.float32
    for a, o, e in zip(got, oracle, eager, strict=True):
        assert a.shape == o.shape
        assert_within_eager_error(a, o, e, dtype=torch.float32, scale=4)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kl_low_precision_and_noncontiguous(device, backend, dtype):
    logits = (torch.randn(3, 5, 40, device=device) * 2).transpose(1, 2).to(dtype)  # [3, 40, 5], dim 1 strided
    fn = lambda t, r: ops.categorical_kl_uniform(t, 1, reduction=r, backend=backend)  # noqa: E731
    got = _loss_and_grads(fn, [logits], "mean")
    oracle = _loss_and_grads(lambda t, r: reference.categorical_kl_uniform(t, 1, r), [logits.double()], "mean")
    assert_close(got[0], oracle[0], dtype=torch.float32, scale=10)
    assert got[1].dtype == dtype
    assert_close(got[1], oracle[1], dtype=dtype)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((3, 53), -1), ((2, 29, 19), 1)])
def test_kl_eight_lane_paths_with_saturated_logits(device, backend, dtype, shape, dim):
    """The C++ kernels' eight-lane exp and its one-element tails: rows of 53 logits (three groups of 16 lanes
    and 5 more), and 19 rows read along a strided dim (a tile of 16, then 3); a third of the logits so far
    below their row's max that exp underflows to 0."""
    logits = torch.randn(shape, device=device) * 3
    logits = torch.where(torch.rand(shape, device=device) < 1 / 3, torch.full_like(logits, -1e4), logits).to(dtype)
    fn = lambda t, r: ops.categorical_kl_uniform(t, dim, reduction=r, backend=backend)  # noqa: E731
    got = _loss_and_grads(fn, [logits], "mean")
    oracle = _loss_and_grads(lambda t, r: reference.categorical_kl_uniform(t, dim, r), [logits.double()], "mean")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert_close(got[0], oracle[0], dtype=torch.float32, scale=10)
    assert got[1].dtype == dtype
    assert_close(got[1], oracle[1], dtype=dtype)


@device_backends
def test_kl_is_zero_for_uniform_and_ln_k_for_one_hot(device, backend):
    u = torch.full((2, 10, 3), 1.5, device=device)
    assert ops.categorical_kl_uniform(u, backend=backend).abs().item() < 1e-6
    h = torch.full((1, 10), -1e4, device=device)
    h[0, 3] = 0
    kl = ops.categorical_kl_uniform(h, dim=1, reduction="sum", backend=backend)
    assert abs(kl.item() - torch.log(torch.tensor(10.0)).item()) < 1e-5


# The module uses them ------------------------------------------------------------------------------------


@device_backends
def test_discrete_vae_uses_the_selected_backend(device, backend, monkeypatch):
    from dalle_fast.nn import dvae as nn_dvae

    called = []
    real = ops.gumbel_quantize

    def spy(*args, **kwargs):
        called.append(dalle_fast._dispatch.requested_backend(kwargs.get("backend"))[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "gumbel_quantize", spy)
    x, w, b, _ = _qinputs(1, 12, (2, 2), 4, device)
    with ops.use_backend(backend):
        got = nn_dvae._gumbel_quantize(x, w, b, tau=1.0, hard=False, seed=1, offset=0)
    assert called == [backend]
    assert_close(got, reference.gumbel_quantize(x, w, b, tau=1.0, hard=False, seed=1), scale=10)


# Registration, opcheck, compile --------------------------------------------------------------------------


def test_extension_registers_the_ops():
    assert dalle_fast.extension_error is None, dalle_fast.extension_error
    for op in dalle_fast.ops.dvae.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CPU"), op


def _opcheck_cases(device):
    x = torch.randn(2, 19, 3, 5, device=device, requires_grad=True)
    w = torch.randn(6, 19, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    g = torch.randn(2, 6, 3, 5, device=device)
    lse = torch.randn(2, 15, device=device)
    idx = torch.randint(0, 19, (2, 15), device=device)
    px = (torch.rand(3, 4, 5, device=device) * 0.8 + 0.1).requires_grad_(True)
    mu = torch.randn(3, 4, 5, device=device, requires_grad=True)
    lb = torch.randn(3, 4, 5, device=device, requires_grad=True)
    lg = torch.randn(3, 11, 4, device=device, requires_grad=True)
    stats = torch.randn(2, 12, device=device)
    return {
        "gumbel_quantize_fwd": [(x, w, b, 0.5, False, 3, 1), (x, w, None, 1.0, True, -7, 4)],
        "gumbel_quantize_bwd": [
            (g, x.detach(), w.detach(), lse, idx, 0.5, False, 3, 1),
            (g, x.detach(), w.detach(), lse, idx, 0.5, True, 3, 0),
        ],
        "logit_laplace_nll_fwd": [(px, mu, lb, 0), (px, mu, lb, 1), (px, mu, lb, 2)],
        "logit_laplace_nll_bwd": [(torch.randn(3, 4, 5, device=device), px.detach(), mu.detach(), lb.detach(), 0),
                                  (torch.tensor(2.0, device=device), px.detach(), mu.detach(), lb.detach(), 1)],
        "categorical_kl_uniform_fwd": [(lg, 1, 0), (lg, 2, 1), (lg, 0, 2)],
        "categorical_kl_uniform_bwd": [(torch.randn(3, 4, device=device), lg.detach(), stats, 1, 0),
                                       (torch.tensor(1.5, device=device), lg.detach(), stats, 1, 1)],
    }  # fmt: skip


@kernel_backends
def test_opcheck(device, backend):
    op_by_name = registered_ops(backend)
    for name, cases in _opcheck_cases(device).items():
        for args in cases:
            torch.library.opcheck(op_by_name[name], args)


@kernel_backends
def test_torch_compile(device, backend):
    def step(logits, w, b, px, mu, lb):
        h = ops.gumbel_quantize(logits * 2, w, b, tau=0.5, seed=3, offset=4, backend=backend)
        nll = ops.logit_laplace_nll(px, mu + h.mean(), lb, backend=backend)
        kl = ops.categorical_kl_uniform(logits, 1, backend=backend)
        return nll + 0.5 * kl + h.square().mean()

    x, w, b, _ = _qinputs(2, 20, (2, 3), 5, device)
    px, mu, lb = _pixels((2, 3, 4), device)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss = compiled(x, w, b, px, mu, lb)
    got = torch.autograd.grad(loss, (x, w, b))
    ref_loss = step(x, w, b, px, mu, lb)
    ref = torch.autograd.grad(ref_loss, (x, w, b))
    assert_close(loss, ref_loss)
    for a, e in zip(got, ref, strict=True):
        assert_close(a, e)


# Bad input -----------------------------------------------------------------------------------------------


@device_backends
def test_bad_input(device, backend):
    x = torch.randn(2, 8, 3, 3, device=device)
    w = torch.randn(4, 8, device=device)
    q = ops.gumbel_quantize
    with pytest.raises(TypeError, match="logits: expected float16, bfloat16, float32 or float64, got torch.int64"):
        q(x.long(), w, backend=backend)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        q([1.0], w, backend=backend)
    with pytest.raises(TypeError, match="weight: expected float16, bfloat16, float32 or float64, got torch.int32"):
        q(x, w.int(), backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected K = 8 input channels .* got shape \(4, 7\)"):
        q(x, torch.randn(4, 7, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected \[C, K\] or \[C, K, 1, 1\], got shape \(4, 8, 3, 3\)"):
        q(x, torch.randn(4, 8, 3, 3, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"logits: expected \[B, K, \*spatial\]"):
        q(torch.randn(8, device=device), w, backend=backend)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        q(x, w, torch.randn(5, device=device), backend=backend)
    with pytest.raises(ValueError, match=f"weight: expected a tensor on {x.device}"):
        q(x, w.to("meta"), backend=backend)
    for tau in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau: expected a finite number > 0"):
            q(x, w, tau=tau, backend=backend)
    with pytest.raises(TypeError, match="hard: expected a bool"):
        q(x, w, hard=1, backend=backend)
    with pytest.raises(ValueError, match="seed: expected None or an integer"):
        q(x, w, seed=-1, backend=backend)
    with pytest.raises(ValueError, match="offset: expected an integer >= 0"):
        q(x, w, offset=-1, backend=backend)
    px, mu, lb = _pixels((2, 3), device)
    with pytest.raises(ValueError, match="reduction: expected one of 'mean', 'sum', 'none', got 'avg'"):
        ops.logit_laplace_nll(px, mu, lb, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="x, mu, log_b: expected broadcastable shapes"):
        ops.logit_laplace_nll(px, mu, torch.randn(4, device=device), backend=backend)
    with pytest.raises(TypeError, match="mu: expected float16"):
        ops.logit_laplace_nll(px, mu.long(), lb, backend=backend)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        ops.categorical_kl_uniform(x, reduction=None, backend=backend)
    with pytest.raises(IndexError, match=r"dim: expected an integer in \[-4, 3\]"):
        ops.categorical_kl_uniform(x, dim=4, backend=backend)
    with pytest.raises(ValueError, match="at least one code"):
        ops.categorical_kl_uniform(torch.randn(2, 0, 3, device=device), backend=backend)


@kernel_backends
def test_kernel_backends_reject_what_they_cannot_serve(device, backend):
    x64 = torch.randn(2, 8, 3, device=device, dtype=torch.float64)
    w = torch.randn(4, 8, device=device)
    with pytest.raises(dalle_fast.BackendUnavailable, match="kernels take float16, bfloat16 or float32"):
        ops.gumbel_quantize(x64, w, backend=backend)
    with pytest.raises(dalle_fast.BackendUnavailable, match="kernels take float16, bfloat16 or float32"):
        ops.categorical_kl_uniform(x64, backend=backend)
    with pytest.raises(dalle_fast.BackendUnavailable, match="meta"):
        ops.gumbel_quantize(x64.float().to("meta"), w.to("meta"), backend=backend)
    op = registered_ops(backend)["gumbel_quantize_bwd"]
    x = torch.randn(2, 8, 3, device=device)
    with pytest.raises((RuntimeError, ValueError), match="grad"):
        op(torch.randn(2, 5, 3, device=device), x, w, torch.zeros(2, 3, device=device), torch.zeros(0, 0).long(),
           1.0, False, 0, 0)  # fmt: skip
    with pytest.raises((RuntimeError, ValueError), match="reduction"):
        registered_ops(backend)["logit_laplace_nll_fwd"](x, x, x, 3)


def test_fp64_goes_to_eager_automatically():
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    assert ops.gumbel_quantize(x, w, seed=1).dtype == torch.float64
    assert ops.categorical_kl_uniform(x).dtype == torch.float64
    assert ops.available_backends("gumbel_quantize", "cpu")[-1] == "eager"
