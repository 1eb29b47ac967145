"""Parity of every backend of the Gumbel-softmax family with the eager reference, and its contract."""

import json
import math
import os
import pathlib

import pytest
import torch
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import assert_close, assert_within_eager_error

import dalle_fast
from dalle_fast import ops, reference
from dalle_fast.ops.gumbel import registered_ops

# A copy of ../shared/vectors travels with the repository (the GPU machine gets the repository alone).
VECTORS = pathlib.Path(__file__).resolve().parent / "vectors" / "philox.json"
SHARED_VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors" / "philox.json"
SEEDS = [0, 2**63 + 5]  # a 32-bit key and one whose high word has the top bit set
GUMBEL_MIN, GUMBEL_MAX = -math.log(-math.log(2.0**-32)), -math.log(2.0**-24)

device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)

# (shape, dim): K in {1000, 8191, 8192, 16384} on the last dim, the dVAE's dim=1 layout (inner = H*W, also
# with inner not a multiple of 4), a leading dim, K = 1. Rows are few: Triton runs in its interpreter here.
CASES = [
    ((3, 1000), -1),
    ((2, 8191), -1),
    ((2, 8192), -1),
    ((1, 16384), -1),
    ((1, 12288), -1),  # the CUDA row kernels' dynamic smem just under 48 KiB (fwd) ...
    ((1, 6144), -1),  # ... and for the backward's cache
    ((2, 37, 4, 4), 1),
    ((2, 1000, 3, 5), 1),
    ((1, 8192, 2, 2), 1),
    ((7, 3, 5), 0),
    ((4, 1), -1),
]


def _logits(shape, dtype, device, layout="contiguous"):
    """Fresh random logits (never zeros) in the layout under test, with the logical shape `shape`."""
    if layout == "contiguous":
        x = torch.randn(shape, device=device) * 3
    elif layout == "transposed":  # same logical shape, memory in reverse dim order
        x = (torch.randn(tuple(reversed(shape)), device=device) * 3).permute(*reversed(range(len(shape))))
    elif layout == "strided":  # every other element of a wider last dim
        wide = torch.randn((*shape[:-1], 2 * shape[-1]), device=device) * 3
        x = wide[..., ::2]
    else:
        raise ValueError(layout)
    assert x.shape == torch.Size(shape)
    return x.to(dtype)


def _vectors():
    with open(VECTORS) as f:
        return json.load(f)["cases"]


# The random stream ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_VECTORS.exists(), reason="no ../shared beside this checkout")
def test_vector_copy_is_current():
    assert VECTORS.read_bytes() == SHARED_VECTORS.read_bytes()


def test_reference_philox_matches_vectors():
    for case in _vectors():
        n = torch.tensor(case["n"], dtype=torch.int64)
        bits = reference.philox_uint32(n, case["seed"])
        assert bits.tolist() == case["uint32"], case["seed"]
        expected = torch.tensor(case["uniform"], dtype=torch.float32)
        assert torch.equal(reference.uniform_from_uint32(bits), expected), case["seed"]


@device_backends
def test_noise_matches_vectors(device, backend):
    """Element n of the stream, reached through `offset`, is -log(-log(u)) of the vector's uniform u."""
    for case in _vectors():
        u = torch.tensor(case["uniform"], dtype=torch.float64)
        expected = -torch.log(torch.clamp_min(-torch.log(torch.clamp_min(u, 2.0**-32)), 2.0**-24))
        got = torch.stack(
            [ops.gumbel_noise([1], seed=case["seed"], offset=n, device=device, backend=backend)[0] for n in case["n"]]
        )
        assert_close(got, expected, torch.float32)


@device_backends
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 3, 2**40 + 1])
@pytest.mark.parametrize("shape", [(1001,), (3, 5, 7), (0, 4)])
def test_noise_matches_reference(device, backend, seed, offset, shape):
    got = ops.gumbel_noise(shape, seed=seed, offset=offset, device=device, backend=backend)
    assert got.shape == torch.Size(shape) and got.dtype == torch.float32 and got.device.type == device
    expected = reference.gumbel_noise(shape, seed, offset, dtype=torch.float64)
    assert_close(got, expected)
    assert bool(((got >= GUMBEL_MIN - 1e-4) & (got <= GUMBEL_MAX + 1e-4)).all())


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_noise_dtype(device, backend, dtype):
    got = ops.gumbel_noise((64, 9), seed=7, offset=5, device=device, dtype=dtype, backend=backend)
    assert got.dtype == dtype
    assert_close(got, reference.gumbel_noise((64, 9), 7, 5, dtype=torch.float64), dtype)


def test_noise_sub_blocks_agree():
    """The stream does not depend on how it is cut: element n is the same from any offset."""
    whole = ops.gumbel_noise((100,), seed=3, offset=10, backend="eager")
    part = ops.gumbel_noise((50,), seed=3, offset=47, backend="eager")
    assert torch.equal(whole[37:87], part)


def test_noise_guard_is_finite():
    u = torch.tensor([0.0, 2.0**-31, 0.5, 1 - 2.0**-24, 1.0], dtype=torch.float32)
    g = reference.philox.gumbel_from_uniform(u)
    assert bool(torch.isfinite(g).all())
    assert g.min().item() >= GUMBEL_MIN - 1e-5 and g.max().item() <= GUMBEL_MAX + 1e-5


@device_backends
def test_noise_is_gumbel_distributed(device, backend):
    """Mean of a standard Gumbel is the Euler-Mascheroni constant, variance pi^2 / 6."""
    g = ops.gumbel_noise((200_000,), seed=11, device=device, backend=backend).double()
    assert abs(g.mean().item() - 0.5772156649) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


# gumbel_softmax ------------------------------------------------------------------------------------------


def _reference_softmax(x, tau, hard, dim, seed, offset):
    """The eager result in fp32 math (fp64 for fp64 input), differentiable: returns (input leaf, output)."""
    xr = x.detach().cpu().double() if x.dtype == torch.float64 else x.detach().cpu().float()
    xr.requires_grad_(True)
    y = reference.gumbel_softmax(xr, tau, hard, dim, seed, offset)
    return xr, y


def _check_softmax(x, y, tau, hard, dim, seed, offset, dtype=torch.float32, scale=1.0, w=None):
    """Forward and gradient of a backend's result y = gumbel_softmax(x) against the fp64 oracle, within
    twice the error of eager fp32 (the reduction over K is long), for an upstream gradient w (random
    by default)."""
    w = torch.randn(x.shape, device=x.device).to(y.dtype) if w is None else w
    (y * w).sum().backward()
    outs = {}
    for name, cd in (("oracle", torch.float64), ("eager", torch.float32)):
        xr = x.detach().cpu().to(cd).requires_grad_(True)
        yr = reference.gumbel_softmax(xr, tau, hard, dim, seed, offset)
        (yr * w.cpu().to(cd)).sum().backward()
        outs[name] = (yr.detach(), xr.grad)
    assert_within_eager_error(y, outs["oracle"][0], outs["eager"][0], dtype)
    assert_within_eager_error(x.grad, outs["oracle"][1], outs["eager"][1], dtype, scale)


@device_backends
@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("hard", [False, True])
def test_softmax_parity(device, backend, shape, dim, hard):
    seed, offset, tau = SEEDS[1], 3, 1.0
    x = _logits(shape, torch.float32, device).requires_grad_(True)
    y = ops.gumbel_softmax(x, tau, hard, dim, seed=seed, offset=offset, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    if hard:  # the one-hot itself is exact
        assert torch.equal(y.detach().cpu(), reference.gumbel_softmax(x.detach().cpu(), tau, hard, dim, seed, offset))
    _check_softmax(x, y, tau, hard, dim, seed, offset)


@device_backends
@pytest.mark.parametrize("tau", [1.0, 1 / 16])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("shape,dim", [((3, 1000), -1), ((2, 64, 3, 5), 1), ((2, 8192, 2, 2), 1)])
def test_softmax_noncontiguous_and_tau(device, backend, tau, layout, shape, dim):
    seed, offset = SEEDS[0], 0
    x = _logits(shape, torch.float32, device, layout).requires_grad_(True)
    assert not x.is_contiguous()
    y = ops.gumbel_softmax(x, tau, False, dim, seed=seed, offset=offset, backend=backend)
    _check_softmax(x, y, tau, False, dim, seed, offset, scale=1 / tau)
    # and with a non-contiguous upstream gradient
    x.grad = None
    y = ops.gumbel_softmax(x, tau, False, dim, seed=seed, offset=offset, backend=backend)
    w = torch.randn(shape, device=device).transpose(0, -1).contiguous().transpose(0, -1)
    assert not w.is_contiguous()
    _check_softmax(x, y, tau, False, dim, seed, offset, scale=1 / tau, w=w)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((3, 1000), -1), ((2, 64, 4, 4), 1)])
def test_softmax_low_precision(device, backend, dtype, shape, dim):
    x = _logits(shape, dtype, device).requires_grad_(True)
    y = ops.gumbel_softmax(x, 0.5, False, dim, seed=5, backend=backend)
    assert y.dtype == dtype
    xr, yr = _reference_softmax(x.cpu(), 0.5, False, dim, 5, 0)  # fp32 math on the same low-precision values
    assert_close(y, yr, dtype)
    w = torch.randn(shape, device=device)
    (y * w.to(dtype)).sum().backward()
    (yr * w.to(dtype).float().cpu()).sum().backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad, xr.grad, dtype, scale=2)


@device_backends
def test_softmax_fp64_reference_for_fp32(device, backend):
    """The fp32 kernels stay within fp32 tolerance of an fp64 oracle (the noise's logs in fp64 too)."""
    x = _logits((4, 777), torch.float64, "cpu")
    noise = reference.gumbel_noise(x.shape, 9, 1, dtype=torch.float64)
    expected = torch.softmax((x + noise) / 0.25, dim=-1)
    y = ops.gumbel_softmax(x.float().to(device), 0.25, False, -1, seed=9, offset=1, backend=backend)
    assert_close(y, expected, torch.float32, scale=4)


@device_backends
def test_hard_is_one_hot_with_soft_gradient(device, backend):
    x = _logits((6, 300), torch.float32, device).requires_grad_(True)
    y = ops.gumbel_softmax(x, 0.5, True, -1, seed=21, backend=backend)
    assert torch.equal(y.sum(-1), torch.ones(6, device=device))
    assert bool(((y == 0) | (y == 1)).all())
    w = torch.randn_like(y)
    (y * w).sum().backward()
    x_soft = x.detach().clone().requires_grad_(True)
    (ops.gumbel_softmax(x_soft, 0.5, False, -1, seed=21, backend="eager") * w).sum().backward()
    assert_close(x.grad, x_soft.grad, scale=2)
    # an exact one-hot even where the soft sample is NaN: the first NaN is the argmax, as in torch.argmax
    bad = x.detach().clone()
    bad[1, 5] = bad[1, 9] = float("nan")
    bad[2, :] = -float("inf")
    bad[2, 17] = 3.0
    y = ops.gumbel_softmax(bad, 0.5, True, -1, seed=21, backend=backend)
    assert torch.equal(y.cpu(), reference.gumbel_softmax(bad.cpu(), 0.5, True, -1, 21))
    assert y[1, 5].item() == 1 and y[2, 17].item() == 1


@device_backends
def test_softmax_empty_and_k1(device, backend):
    e = torch.randn(0, 5, device=device, requires_grad=True)
    assert ops.gumbel_softmax(e, dim=-1, seed=1, backend=backend).shape == (0, 5)
    one = torch.randn(5, 1, device=device)
    assert torch.equal(ops.gumbel_softmax(one, dim=-1, seed=1, backend=backend), torch.ones(5, 1, device=device))


@device_backends
def test_softmax_seed_none_uses_torch_generator(device, backend):
    x = _logits((4, 50), torch.float32, device)
    torch.manual_seed(123)
    a = ops.gumbel_softmax(x, backend=backend)
    torch.manual_seed(123)
    b = ops.gumbel_softmax(x, backend=backend)
    c = ops.gumbel_softmax(x, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)


@device_backends
def test_softmax_deterministic(device, backend):
    x = _logits((3, 8192, 2, 2), torch.float32, device)
    a = ops.gumbel_softmax(x, 1.0, False, 1, seed=4, backend=backend)
    b = ops.gumbel_softmax(x, 1.0, False, 1, seed=4, backend=backend)
    assert torch.equal(a, b)


def test_backends_agree_with_each_other():
    """Same seed and offset, same sample on every backend and device, to float rounding."""
    x = _logits((2, 8192, 2, 2), torch.float32, "cpu")
    expected = ops.gumbel_softmax(x, 1.0, False, 1, seed=77, offset=2, backend="eager")
    for d, b in DEVICE_BACKENDS:
        y = ops.gumbel_softmax(x.to(d), 1.0, False, 1, seed=77, offset=2, backend=b)
        assert_close(y, expected, torch.float32)


# Saved tensors -------------------------------------------------------------------------------------------


@kernel_backends
@pytest.mark.parametrize("hard", [False, True])
def test_saved_for_backward_is_only_the_logits(device, backend, hard):
    x = _logits((4, 8192), torch.float16, device).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.gumbel_softmax(x, 1.0, hard, -1, seed=2, backend=backend)
    assert sum(saved) <= x.numel() * x.element_size()
    y.sum().backward()


# gumbel_argmax -------------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("shape,dim", [((5, 1000), -1), ((3, 8191), -1), ((2, 100, 3, 5), 1), ((7, 3, 5), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_parity(device, backend, shape, dim, dtype):
    x = _logits(shape, dtype, device)
    got = ops.gumbel_argmax(x, dim, seed=SEEDS[1], offset=3, backend=backend)
    expected = reference.gumbel_argmax(x.cpu().float(), dim, SEEDS[1], 3)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), expected)


@device_backends
def test_argmax_is_the_hard_sample(device, backend):
    x = _logits((2, 64, 3, 5), torch.float32, device)
    idx = ops.gumbel_argmax(x, 1, seed=8, offset=1, backend=backend)
    hard = ops.gumbel_softmax(x, 1 / 16, True, 1, seed=8, offset=1, backend=backend)
    assert torch.equal(hard.argmax(1), idx)


@device_backends
def test_argmax_ties_and_nan_follow_torch(device, backend):
    """-inf everywhere but two equal finite logits: ties are broken by the noise, never by position; a NaN
    logit wins as in torch.argmax."""
    x = torch.full((3, 40), -float("inf"), device=device)
    x[:, 7] = 2.0
    x[:, 30] = 2.0
    x[2, 12] = float("nan")
    got = ops.gumbel_argmax(x, -1, seed=5, backend=backend)
    expected = reference.gumbel_argmax(x.cpu(), -1, 5, 0)
    assert torch.equal(got.cpu(), expected)
    assert got[2].item() == 12


@device_backends
def test_gumbel_max_property(device, backend):
    """gumbel_argmax draws from softmax(logits): chi-square test over many draws, with a fixed seed."""
    scipy_stats = pytest.importorskip("scipy.stats")
    k, n = 8, 4000
    logits = torch.randn(k, device=device)
    draws = ops.gumbel_argmax(logits.expand(n, k), -1, seed=2024, backend=backend)
    counts = torch.bincount(draws.cpu(), minlength=k).double()
    expected = torch.softmax(logits.cpu().double(), 0) * n
    p = scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue
    assert p > 1e-3, (counts, expected)
    # and it fails for the wrong distribution: uniform expectations are rejected
    assert scipy_stats.chisquare(counts.numpy(), torch.full((k,), n / k).numpy()).pvalue < 1e-3


# Registration, opcheck, compile --------------------------------------------------------------------------


def test_extension_loaded_and_kernels_registered():
    assert dalle_fast.extension_error is None, dalle_fast.extension_error
    for op in ("gumbel_noise", "gumbel_softmax_fwd", "gumbel_softmax_bwd", "gumbel_argmax"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CPU"), op
        if os.environ.get("DALLE_FAST_EXPECT_CUDA") == "1":
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CUDA"), op


def _opcheck_cases(device):
    x = torch.randn(3, 37, 4, device=device, requires_grad=True)
    g = torch.randn(3, 37, 4, device=device)
    like = torch.empty(0, device=device)
    return {
        "gumbel_noise": [(like, [5, 7], 3, 1), (like, [4], -(2**62), 2)],
        "gumbel_softmax_fwd": [
            (x, 0.5, False, 1, 3, 1),
            (x, 1.0, True, 2, -5, 0),
            (x.detach().half(), 1.0, False, 0, 1, 4),
        ],
        "gumbel_softmax_bwd": [
            (g, x.detach(), 0.5, 1, 3, 1),
            (g.transpose(0, 2), x.detach().transpose(0, 2), 1.0, 0, 9, 0),
        ],
        "gumbel_argmax": [(x.detach(), 1, 3, 1), (x.detach(), 2, 3, 0)],
    }


@kernel_backends
def test_opcheck(device, backend):
    op_by_name = registered_ops(backend)
    for name, cases in _opcheck_cases(device).items():
        for args in cases:
            torch.library.opcheck(op_by_name[name], args)


@kernel_backends  # (inductor on the eager reference's int64 Philox graph takes many minutes)
def test_torch_compile(device, backend):
    def step(logits, w):
        y = ops.gumbel_softmax(logits * 2, 0.5, False, 1, seed=3, offset=4, backend=backend)
        return (y * w).sum()

    x = torch.randn(2, 16, 3, device=device, requires_grad=True)
    w = torch.randn(2, 16, 3, device=device)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss = compiled(x, w)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    step(x2, w).backward()
    assert_close(loss, step(x2.detach(), w))
    assert_close(x.grad, x2.grad)


# Bad input -----------------------------------------------------------------------------------------------


@device_backends
def test_bad_input(device, backend):
    x = torch.randn(4, 10, device=device)
    with pytest.raises(TypeError, match="logits: expected float16, bfloat16, float32 or float64, got torch.int64"):
        ops.gumbel_softmax(torch.ones(4, 10, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        ops.gumbel_softmax([1.0, 2.0], backend=backend)
    for tau in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau: expected a finite number > 0"):
            ops.gumbel_softmax(x, tau, backend=backend)
    with pytest.raises(IndexError, match=r"dim: expected an integer in \[-2, 1\] for a 2-dim tensor, got 2"):
        ops.gumbel_softmax(x, dim=2, backend=backend)
    with pytest.raises(IndexError, match="dim"):
        ops.gumbel_argmax(x, dim=-3, backend=backend)
    with pytest.raises(ValueError, match="seed: expected None or an integer in"):
        ops.gumbel_softmax(x, seed=-1, backend=backend)
    with pytest.raises(ValueError, match="seed: expected an integer in"):
        ops.gumbel_noise((3,), seed=2**64, backend=backend)
    with pytest.raises(ValueError, match="offset: expected an integer >= 0"):
        ops.gumbel_argmax(x, offset=-2, backend=backend)
    with pytest.raises(ValueError, match="offset: offset \\+ numel must be at most 2\\*\\*63"):
        ops.gumbel_softmax(x, offset=2**63 - 5, backend=backend)
    with pytest.raises(ValueError, match="logits: expected at least 1 dimension"):
        ops.gumbel_softmax(torch.tensor(1.0, device=device), backend=backend)
    with pytest.raises(ValueError, match="non-empty dim"):
        ops.gumbel_argmax(torch.randn(3, 0, device=device), backend=backend)
    with pytest.raises(TypeError, match="shape: expected a sequence of ints"):
        ops.gumbel_noise(5, seed=1, device=device, backend=backend)


@kernel_backends
def test_kernel_backends_reject_what_they_cannot_serve(device, backend):
    x64 = torch.randn(4, 10, dtype=torch.float64, device=device)
    with pytest.raises(
        dalle_fast.BackendUnavailable, match="kernels take float16, bfloat16 or float32, got torch.float64"
    ):
        ops.gumbel_softmax(x64, backend=backend)
    meta = torch.randn(4, 10, device="meta")
    with pytest.raises(dalle_fast.BackendUnavailable, match="meta"):
        ops.gumbel_softmax(meta, seed=1, backend=backend)
    op = registered_ops(backend)["gumbel_softmax_bwd"]
    with pytest.raises((RuntimeError, ValueError), match="grad"):
        op(torch.randn(4, 11, device=device), torch.randn(4, 10, device=device), 1.0, 1, 0, 0)


def test_fp64_goes_to_eager_automatically():
    x = torch.randn(3, 10, dtype=torch.float64)
    y = ops.gumbel_softmax(x, seed=1)
    assert y.dtype == torch.float64
    assert_close(y, reference.gumbel_softmax(x, 1.0, False, -1, 1))


# Dispatch ------------------------------------------------------------------------------------------------


def test_dispatch_precedence(monkeypatch):
    x = torch.randn(2, 10)
    monkeypatch.setenv("DALLE_FAST_BACKEND", "cuda")
    with pytest.raises(dalle_fast.BackendUnavailable, match="DALLE_FAST_BACKEND=cuda"):
        ops.gumbel_softmax(x, seed=1)
    with ops.use_backend("eager"):  # the context beats the environment
        ops.gumbel_softmax(x, seed=1)
        with ops.use_backend("cuda"), pytest.raises(dalle_fast.BackendUnavailable, match="use_backend"):
            ops.gumbel_softmax(x, seed=1)  # the innermost context wins
        with ops.use_backend("cuda"):
            ops.gumbel_softmax(x, seed=1, backend="eager")  # the argument beats the context
    monkeypatch.setenv("DALLE_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DALLE_FAST_BACKEND: expected one of"):
        ops.gumbel_softmax(x, seed=1)
    monkeypatch.delenv("DALLE_FAST_BACKEND")
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.gumbel_softmax(x, seed=1, backend="fast")
    with pytest.raises(ValueError, match="use_backend"):
        ops.use_backend("gpu").__enter__()


def test_automatic_choice_and_available_backends():
    interpreter = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    assert ops.available_backends("gumbel_softmax", "cpu") == interpreter + ["cpp", "eager"]
    assert "eager" in ops.available_backends("gumbel_argmax", "cpu")
    with pytest.raises(ValueError, match="op_name"):
        ops.available_backends("softmax", "cpu")
    x = torch.randn(2, 10)
    # automatic choice on CPU is the C++ backend, never the interpreter: the result equals backend="cpp"
    assert torch.equal(ops.gumbel_softmax(x, seed=1), ops.gumbel_softmax(x, seed=1, backend="cpp"))


def test_cuda_backend_reports_why_not_on_cpu():
    with pytest.raises(dalle_fast.BackendUnavailable, match="the cuda backend serves cuda tensors, got cpu"):
        ops.gumbel_argmax(torch.randn(2, 5), backend="cuda")
