"""Per-resblock gradient scaling (dalle_fast.amp) and ScaledLinear (dalle_fast.nn): the scaler's rules step by
step, the block's fp32 entry/exit with fused scaling, checkpoints, and the deep fp16 underflow experiment."""

import io
import math

import pytest
import torch
from conftest import DEVICE_BACKENDS
from tolerances import assert_close
from torch import nn

from dalle_fast.amp import PerResblockGradScaler, ScaledResidual
from dalle_fast.nn import ScaledLinear

device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)


def _scaler_with_params(n_blocks=3, **kw):
    """A scaler with one 2-element parameter per block and one parameter outside every block."""
    scaler = PerResblockGradScaler(n_blocks, **kw)
    params = [nn.Parameter(torch.randn(2)) for _ in range(n_blocks)]
    for i, p in enumerate(params):
        scaler.register_block(i, [p])
    head = nn.Parameter(torch.randn(2))
    opt = torch.optim.SGD(params + [head], lr=1.0)
    return scaler, params, head, opt


def _set_grads(scaler, params, head, bad=()):
    """Gradients of 1 (times the block's scale, as a scaled backward leaves them); inf in the blocks `bad`."""
    for i, p in enumerate(params):
        p.grad = torch.ones(2) * scaler.scales[i]
        if i in bad:
            p.grad[0] = float("inf")
    head.grad = torch.ones(2)


# The scaler's rules --------------------------------------------------------------------------------------


def test_scaler_defaults_and_replicas():
    s = PerResblockGradScaler(4)
    assert s.scales.dtype == torch.float32 and s.scales.tolist() == [2.0**13] * 4
    s = PerResblockGradScaler(2, replicas=8, min_scale=2.0**7, max_scale=2.0**24)
    assert s.scales.tolist() == [8 * 2.0**13] * 2
    s.scales.fill_(1.0)  # clamped to [8 * 2**7, 8 * 2**24] at the next step
    scaler, params, head, opt = _scaler_with_params(2, replicas=8)
    scaler.scales.copy_(torch.tensor([1.0, 2.0**30]))
    _set_grads(scaler, params, head)
    assert scaler.step(opt)
    assert scaler.scales.tolist() == [8 * 2.0**7, 8 * 2.0**24]


def test_growth_unscale_and_update_on_finite_steps():
    scaler, params, head, opt = _scaler_with_params(3, init_scale=2.0**10)
    before = [p.detach().clone() for p in params]
    _set_grads(scaler, params, head)
    assert scaler.step(opt) is True
    g = 2.0 ** (1 / 1000)
    torch.testing.assert_close(scaler.scales, torch.full((3,), 2.0**10 * g), rtol=1e-6, atol=0)
    for p, b in zip(params, before, strict=True):  # unscaled to 1 once, then an SGD step of lr 1
        assert_close(p.detach(), b - 1.0)
    assert_close(head.detach(), head.detach())  # the head's gradient is never scaled


def test_backoff_skip_and_cooldown():
    scaler, params, head, opt = _scaler_with_params(3, init_scale=2.0**10, cooldown=3)
    before = [p.detach().clone() for p in params]
    g, b = 2.0 ** (1 / 1000), 2.0**-0.5
    expect = [2.0**10] * 3
    # step 0: block 1 non-finite -> skipped update, block 1 backs off, the others grow
    _set_grads(scaler, params, head, bad=(1,))
    assert scaler.step(opt) is False
    expect = [expect[0] * g, expect[1] * b, expect[2] * g]
    torch.testing.assert_close(scaler.scales, torch.tensor(expect), rtol=1e-6, atol=0)
    for p, bb in zip(params, before, strict=True):
        assert torch.equal(p.detach(), bb)
    # steps 1, 2: block 1 non-finite again, within the cooldown: skipped, no further back-off, no growth
    for _ in range(2):
        _set_grads(scaler, params, head, bad=(1,))
        assert scaler.step(opt) is False
        expect = [expect[0] * g, expect[1], expect[2] * g]
        torch.testing.assert_close(scaler.scales, torch.tensor(expect), rtol=1e-6, atol=0)
    # step 3: 3 steps after the last back-off: it backs off again
    _set_grads(scaler, params, head, bad=(1,))
    assert scaler.step(opt) is False
    expect = [expect[0] * g, expect[1] * b, expect[2] * g]
    torch.testing.assert_close(scaler.scales, torch.tensor(expect), rtol=1e-6, atol=0)
    # a finite step applies the update and grows every block
    _set_grads(scaler, params, head)
    assert scaler.step(opt) is True
    assert not torch.equal(params[0].detach(), before[0])


def test_flag_from_the_block_entry_and_head_check_skip():
    scaler, params, head, opt = _scaler_with_params(2, init_scale=2.0**10)
    _set_grads(scaler, params, head)
    scaler.flag(0).fill_(1)  # what a block entry's filter does when the leaving gradient was non-finite
    assert scaler.step(opt) is False
    assert scaler.scales[0] < 2.0**10 < scaler.scales[1]
    assert scaler.found_inf.tolist() == [0, 0]  # reset by step
    _set_grads(scaler, params, head)
    head.grad[1] = float("nan")  # a parameter outside every block: the step is skipped, no scale backs off
    s_before = scaler.scales.clone()
    assert scaler.step(opt) is False
    assert (scaler.scales > s_before).all()


def test_clamp_min():
    scaler, params, head, opt = _scaler_with_params(1, init_scale=2.0**7, min_scale=2.0**7, cooldown=0)
    for _ in range(3):
        _set_grads(scaler, params, head, bad=(0,))
        scaler.step(opt)
    assert scaler.scales.tolist() == [2.0**7]


def test_unscale_once_then_step_does_not_unscale_again():
    scaler, params, head, opt = _scaler_with_params(2, init_scale=2.0**10)
    _set_grads(scaler, params, head)
    scaler.unscale_(opt)
    assert_close(params[0].grad, torch.ones(2))
    torch.nn.utils.clip_grad_norm_(params, 100.0)  # what unscale_ is for
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        scaler.unscale_(opt)
    before = params[0].detach().clone()
    assert scaler.step(opt)
    assert_close(params[0].detach(), before - 1.0)


def test_state_dict_round_trip_weights_only():
    scaler, params, head, opt = _scaler_with_params(3, init_scale=2.0**10, cooldown=5, replicas=2)
    _set_grads(scaler, params, head, bad=(2,))
    scaler.step(opt)
    buf = io.BytesIO()
    torch.save(scaler.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = PerResblockGradScaler(3, cooldown=125)
    other.load_state_dict(state)
    assert torch.equal(other.scales, scaler.scales) and other.cooldown == 5 and other.replicas == 2
    assert other.state_dict()["step"] == 1
    with pytest.raises(ValueError, match="n_blocks=4"):
        PerResblockGradScaler(4).load_state_dict(state)


def test_scaler_bad_input():
    with pytest.raises(ValueError, match="n_blocks: expected a positive integer"):
        PerResblockGradScaler(0)
    with pytest.raises(ValueError, match="backoff_factor: expected a value in \\(0, 1\\)"):
        PerResblockGradScaler(2, backoff_factor=2.0)
    with pytest.raises(ValueError, match="init_scale: expected a value in \\[min_scale, max_scale\\]"):
        PerResblockGradScaler(2, init_scale=1.0)
    with pytest.raises(ValueError, match="cooldown: expected an integer >= 0"):
        PerResblockGradScaler(2, cooldown=-1)
    s = PerResblockGradScaler(2)
    with pytest.raises(IndexError, match="index: expected an integer in \\[0, 2\\)"):
        ScaledResidual(nn.Linear(2, 2), s, 2)
    p = nn.Parameter(torch.ones(1))
    s.register_block(0, [p])
    with pytest.raises(ValueError, match="already belongs to a block"):
        s.register_block(1, [p])
    with pytest.raises(TypeError, match="scaler: expected a PerResblockGradScaler"):
        ScaledResidual(nn.Linear(2, 2), object(), 0)
    with pytest.raises(TypeError, match="x: expected the fp32 residual stream"):
        ScaledResidual(nn.Linear(2, 2), PerResblockGradScaler(1), 0)(torch.randn(2, 2).half())


# ScaledResidual ------------------------------------------------------------------------------------------


def _mlp(seed, dtype=torch.float16, backend=None):
    torch.manual_seed(seed)
    return nn.Sequential(
        ScaledLinear(12, 20, compute_dtype=dtype, backend=backend),
        nn.ReLU(),
        ScaledLinear(20, 12, compute_dtype=dtype, backend=backend),
    )


@device_backends
@pytest.mark.parametrize("fused_exit", [False, True])
def test_scaled_residual_gradients(device, backend, fused_exit):
    """Gradients of x and of the block's parameters (unscaled once) match an fp32 run of the same block;
    the generic exit pass and the output projection's fused exit agree."""
    x = torch.randn(2, 7, 12, device=device)
    scaler = PerResblockGradScaler(1, init_scale=2.0**12, device=device)
    block = _mlp(0, backend=backend).to(device)
    layer = ScaledResidual(block, scaler, 0, out_proj=block[2] if fused_exit else None, backend=backend)
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    y.backward(g)
    assert scaler.found_inf.item() == 0
    ref = _mlp(0, torch.float32, backend="eager").to(device)
    x32 = x.clone().requires_grad_(True)
    (x32 + ref(x32)).backward(g)
    torch.testing.assert_close(y, x32 + ref(x32), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xr.grad, x32.grad, rtol=2e-2, atol=2e-2)
    for p, q in zip(block.parameters(), ref.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        gm = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad / 2.0**12, q.grad, rtol=2e-2, atol=2e-2 * gm)  # scaled until unscaled


@device_backends
def test_scaled_residual_filters_and_flags_an_overflow(device, backend):
    """A scale so large that the block's gradient overflows fp16: the leaving gradient reaches the identity
    path finite (filtered), the block's flag is set, the step is skipped and the block's scale backs off."""
    x = torch.randn(3, 12, device=device, requires_grad=True)
    scaler = PerResblockGradScaler(1, init_scale=2.0**24, device=device)
    block = _mlp(1, backend=backend).to(device)
    layer = ScaledResidual(block, scaler, 0, backend=backend)
    y = layer(x)
    y.backward(torch.full_like(y, 1e3))
    assert scaler.found_inf.item() == 1
    assert torch.isfinite(x.grad).all()
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    assert scaler.step(opt) is False
    assert scaler.scales.item() == pytest.approx(2.0**24 * 2**-0.5)


def test_scaled_linear_is_a_drop_in_for_linear():
    ref = nn.Linear(9, 5)
    layer = ScaledLinear(9, 5)
    layer.load_state_dict(ref.state_dict(), strict=True)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.dtype == torch.float32
    x = torch.randn(4, 9)
    y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref(x), rtol=5e-3, atol=5e-3)
    assert ScaledLinear(3, 2, bias=False).bias is None
    assert "compute_dtype=torch.float16" in repr(layer)


# The deep fp16 network: underflow under one global scale, preserved per resblock -------------------------

N_BLOCKS, D, T = 24, 16, 32


class _Gain(nn.Module):
    def __init__(self, g: float):
        super().__init__()
        self.g = g

    def forward(self, x):
        return x * self.g


EARLY = 8  # the first blocks, whose parameter gradients are tiny (as the paper found for early resblocks)


def _deep_blocks(dtype=torch.float16):
    """24 fp16 MLP blocks. The first EARLY multiply by 2**-15 twice (powers of two, exact): their parameter
    gradients are ~2**-30 of the gradient entering them, and so is their input Jacobian (they do not change
    the residual-stream gradient). The later ones have large parameter gradients but a small Jacobian: a
    large activation (a bias of 2**8) feeds weights scaled by 2**-8, so their weight gradients are 2**8 times
    larger while their outputs and input Jacobians stay small. The late blocks bound a single global scale;
    the early ones then underflow."""
    torch.manual_seed(1)
    blocks = []
    for i in range(N_BLOCKS):
        lin = [ScaledLinear(D, D, compute_dtype=dtype) for _ in range(3)]
        gain = 2.0**-15 if i < EARLY else 1.0
        if i >= EARLY:
            with torch.no_grad():
                lin[0].bias.fill_(2.0**8)
                lin[1].weight.mul_(2.0**-8)
        blocks.append(nn.Sequential(nn.Tanh(), lin[0], nn.ReLU(), lin[1], _Gain(gain), lin[2], _Gain(gain)))
    return blocks


class _PlainResidual(nn.Module):
    """x + block(x in the block's dtype) in fp32, no per-block scaling (the single-global-scale baseline)."""

    def __init__(self, block, dtype):
        super().__init__()
        self.block, self.dtype = block, dtype

    def forward(self, x):
        return x + self.block(x.to(self.dtype)).float()


def _zero_fraction(blocks, first, last):
    grads = [blk[1].weight.grad for blk in blocks[first:last]]
    return torch.cat([g.flatten() for g in grads]).eq(0).float().mean().item()


def test_deep_fp16_underflow_global_vs_per_resblock():
    x, target = torch.randn(T, D), torch.randn(T, D)

    def loss_fn(out):
        return (out * target).mean()

    # fp32 reference: no gradient is zero
    ref = _deep_blocks(torch.float32)
    loss_fn(nn.Sequential(*[_PlainResidual(b, torch.float32) for b in ref])(x)).backward()
    assert _zero_fraction(ref, 0, EARLY) < 0.05

    # one global scale, as a loss scaler settles it: the largest power of two without a non-finite gradient
    blocks = _deep_blocks()
    net = nn.Sequential(*[_PlainResidual(b, torch.float16) for b in blocks])
    scale = 2.0**24  # the largest scale a loss scaler may reach, halved until every gradient is finite
    while True:
        net.zero_grad()
        (loss_fn(net(x)) * scale).backward()
        if all(torch.isfinite(p.grad).all() for p in net.parameters()):
            break
        scale /= 2
    global_zero = _zero_fraction(blocks, 0, EARLY)

    # per-resblock scales, settled by the scaler's own back-off from the maximum (cooldown 0, steps of 16x)
    blocks = _deep_blocks()
    scaler = PerResblockGradScaler(N_BLOCKS, init_scale=2.0**24, backoff_factor=2.0**-4, cooldown=0)
    net = nn.Sequential(*[ScaledResidual(b, scaler, i) for i, b in enumerate(blocks)])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    for _ in range(10):
        net.zero_grad()
        loss_fn(net(x)).backward()
        if scaler.step(opt):
            break
    else:
        pytest.fail("the per-resblock scales did not settle in 10 steps")
    net.zero_grad()
    loss_fn(net(x)).backward()
    scaler.unscale_(opt)
    per_block_zero = _zero_fraction(blocks, 0, EARLY)
    scales = [int(math.log2(s)) for s in scaler.scales.tolist()]

    print(f"global scale 2**{int(math.log2(scale))}: zero fraction of the first blocks' W1 gradients {global_zero:.2f}")
    print(f"per-resblock scales 2**{scales}: zero fraction {per_block_zero:.2f}")
    assert scales[0] - scales[-1] >= 8  # the scales really differ per block: the early ones are larger
    assert global_zero >= 0.3
    assert per_block_zero <= 0.1
    assert global_zero - per_block_zero >= 0.25
    # and the preserved gradients are right: close to the fp32 run's
    for blk, r in zip(blocks[:EARLY], ref[:EARLY], strict=True):
        g, gr = blk[1].weight.grad, r[1].weight.grad
        assert ((g - gr).norm() / gr.norm()).item() < 0.25
