"""Parity of every backend of the scaled matmul family with the eager reference, and its contract."""

import os

import pytest
import torch
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import assert_close, assert_within_eager_error

import dalle_fast
from dalle_fast import ops, reference
from dalle_fast.ops.matmul import OPS, available_backends, registered_ops

device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
LOW = (torch.float16, torch.bfloat16)

# (a's shape, N): odd M, N, K; a batched a; a single row; K = 1. Small: Triton runs in its interpreter here.
CASES = [((37, 45), 29), ((2, 19, 33), 40), ((1, 64), 65), ((3, 5, 1), 7), ((70, 20), 1)]


def _rand(shape, dtype, device, layout="contiguous", mag=1.0):
    """Fresh random values (never zeros) with the logical shape `shape` in the layout under test."""
    if layout == "contiguous":
        x = torch.randn(shape, device=device) * mag
    elif layout == "transposed":  # last two dims swapped in memory
        x = (torch.randn((*shape[:-2], shape[-1], shape[-2]), device=device) * mag).transpose(-1, -2)
    elif layout == "strided":  # every other element of a wider last dim
        x = (torch.randn((*shape[:-1], 2 * shape[-1]), device=device) * mag)[..., ::2]
    else:
        raise ValueError(layout)
    assert x.shape == torch.Size(shape)
    return x.to(dtype)


def _oracle(a, b, bias, s):
    """fp64 s * (a @ b) + bias of the (already rounded) inputs."""
    y = s * (a.double() @ b.double())
    return y + bias.double() if bias is not None else y


def _eager_low(a, b, bias, s):
    """torch in the precision under test: the yardstick of DESIGN section 8 for GEMMs."""
    y = torch.matmul(a, b) * s
    return y + bias if bias is not None else y


# Forward parity ------------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("a_shape,N", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_parity(device, backend, a_shape, N, dtype, with_bias):
    K = a_shape[-1]
    a = _rand(a_shape, dtype, device)
    b = _rand((K, N), dtype, device)
    bias = _rand((N,), dtype, device) if with_bias else None
    scale = torch.tensor(0.75, device=device)
    y = ops.scaled_matmul(a, b, bias, scale=scale, backend=backend)
    assert y.dtype == dtype and y.shape == (*a_shape[:-1], N) and y.is_contiguous()
    assert_within_eager_error(y, _oracle(a, b, bias, 0.75), _eager_low(a, b, bias, 0.75), scale=4)


@device_backends
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_noncontiguous_inputs(device, backend, layout):
    a = _rand((3, 21, 34), torch.float32, device, layout)
    b = _rand((34, 27), torch.float32, device, layout)
    bias = _rand((54,), torch.float32, device)[::2]
    assert not a.is_contiguous() and not b.is_contiguous() and not bias.is_contiguous()
    y = ops.scaled_matmul(a, b, bias, scale=1.5, backend=backend)
    assert_within_eager_error(y, _oracle(a, b, bias, 1.5), _eager_low(a, b, bias, 1.5))


@device_backends
@pytest.mark.parametrize("dtype", LOW)
def test_mixed_fp32_a_is_scaled_before_rounding(device, backend, dtype):
    # Tiny fp32 values that underflow fp16 unless the scale lifts them before the rounding.
    a = _rand((2, 9, 40), torch.float32, device, mag=2.0**-30)
    b = _rand((40, 13), dtype, device)
    bias = _rand((13,), torch.float32, device)
    s = 2.0**24
    y = ops.scaled_matmul(a, b, bias, scale=torch.tensor(s, device=device), backend=backend)
    assert y.dtype == dtype
    a_r = (a * s).to(dtype)  # what every backend multiplies: a * s rounded to b's dtype
    assert_within_eager_error(y, _oracle(a_r, b, bias, 1.0), _eager_low(a_r.float(), b.float(), bias, 1.0).to(dtype))
    assert y.float().abs().mean() > 0.1  # not lost to underflow


@device_backends
def test_empty_and_k0(device, backend):
    b = _rand((0, 6), torch.float32, device)
    bias = _rand((6,), torch.float32, device)
    y = ops.scaled_matmul(torch.randn(4, 0, device=device), b, bias, scale=2.0, backend=backend)
    assert_close(y, bias.expand(4, 6))
    y = ops.scaled_matmul(torch.randn(0, 5, device=device), torch.randn(5, 3, device=device), backend=backend)
    assert y.shape == (0, 3)
    # gradients through K = 0 and M = 0
    for a_shape, K in (((4, 0), 0), ((0, 5), 5)):
        a = torch.randn(a_shape, device=device, requires_grad=True)
        b = torch.randn(K, 3, device=device, requires_grad=True)
        bias = torch.randn(3, device=device, requires_grad=True)
        y = ops.scaled_matmul(a, b, bias, scale=2.0, backend=backend)
        da, db, dbias = torch.autograd.grad(y, (a, b, bias), torch.ones_like(y))
        assert da.shape == a.shape and db.shape == b.shape
        assert_close(dbias, torch.full((3,), float(a_shape[0]), device=device))


# Filter and flag -----------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_filter_zeroes_exactly_the_nonfinite_and_flags(device, backend, dtype):
    M, K, N = 13, 17, 11
    a = _rand((M, K), dtype, device)
    b = _rand((K, N), dtype, device)
    bias = _rand((N,), dtype, device)
    a[4, 3] = float("nan")  # row 4 all NaN
    bias[7] = float("inf")  # column 7 all inf
    a[9, :] = 1000.0  # row 9 overflows fp16 in the output only (finite in fp32)
    b[:, 2] = 1000.0 if dtype == torch.float16 else 1.0
    expect = _oracle(a, b, bias, 1.0).to(dtype)
    bad = ~torch.isfinite(expect)
    assert bad[4].all() and bad[:, 7].all() and (dtype != torch.float16 or bad[9, 2])
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    y = ops.scaled_matmul(a, b, bias, filter_nonfinite=True, nonfinite_flag=flag, backend=backend)
    assert flag.item() == 1
    assert torch.isfinite(y).all()
    assert (y[bad] == 0).all()
    good = ~bad
    assert_within_eager_error(y[good], _oracle(a, b, bias, 1.0)[good], _eager_low(a, b, bias, 1.0)[good], scale=4)
    # without the filter the non-finite values pass and the flag stays as it was
    flag2 = torch.zeros(1, dtype=torch.int32, device=device)
    y2 = ops.scaled_matmul(a, b, bias, nonfinite_flag=flag2, backend=backend)
    assert flag2.item() == 0 and torch.isnan(y2[4]).all()


@device_backends
def test_flag_clear_on_clean_input_and_ored(device, backend):
    a, b = _rand((9, 10), torch.float16, device), _rand((10, 12), torch.float16, device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    ops.scaled_matmul(a, b, scale=1000.0, filter_nonfinite=True, nonfinite_flag=flag, backend=backend)
    assert flag.item() == 0
    flag.fill_(1)  # ORed, never cleared
    ops.scaled_matmul(a, b, filter_nonfinite=True, nonfinite_flag=flag, backend=backend)
    assert flag.item() == 1


@device_backends
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(
    "dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)]
)
def test_scale_filter(device, backend, invert, dtypes):
    x_dtype, out_dtype = dtypes
    x = _rand((5, 37), x_dtype, device, "transposed", mag=30.0)
    x[1, 2], x[3, 30] = float("inf"), float("nan")
    s = torch.tensor(3000.0, device=device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    y = ops.scale_filter(
        x, s, invert=invert, filter_nonfinite=True, nonfinite_flag=flag, dtype=out_dtype, backend=backend
    )
    expect = (x.double() / 3000.0 if invert else x.double() * 3000.0).to(out_dtype)
    bad = ~torch.isfinite(expect)
    assert bad[1, 2] and bad[3, 30] and flag.item() == 1
    assert (y[bad] == 0).all()
    assert_close(y[~bad], expect[~bad])
    clean = _rand((4, 9), x_dtype, device)
    flag.zero_()
    ops.scale_filter(clean, 2.0, filter_nonfinite=True, nonfinite_flag=flag, backend=backend)
    assert flag.item() == 0


# Gradients -----------------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("a_shape,N", [((2, 19, 33), 40), ((37, 45), 29)])
def test_gradients(device, backend, dtype, a_shape, N):
    K = a_shape[-1]
    a = _rand(a_shape, dtype, device).requires_grad_(True)
    b = _rand((K, N), dtype, device).requires_grad_(True)
    bias = _rand((N,), dtype, device).requires_grad_(True)
    g = _rand((*a_shape[:-1], N), dtype, device)
    s = torch.tensor(0.5, device=device)
    y = ops.scaled_matmul(a, b, bias, scale=s, backend=backend)
    da, db, dbias = torch.autograd.grad(y, (a, b, bias), g)
    a64, b64, bias64 = (t.detach().double().requires_grad_(True) for t in (a, b, bias))
    e_a, e_b, e_bias = torch.autograd.grad(_oracle(a64, b64, bias64, 0.5), (a64, b64, bias64), g.double())
    al, bl, biasl = (t.detach().requires_grad_(True) for t in (a, b, bias))
    l_a, l_b, l_bias = torch.autograd.grad(_eager_low(al, bl, biasl, 0.5), (al, bl, biasl), g)
    assert da.dtype == dtype and db.dtype == dtype and dbias.dtype == dtype
    assert_within_eager_error(da, e_a, l_a, scale=4)
    assert_within_eager_error(db, e_b, l_b, scale=8)
    assert_within_eager_error(dbias, e_bias, l_bias, scale=8)


@device_backends
def test_scale_filter_gradient(device, backend):
    x = _rand((6, 7), torch.float16, device).requires_grad_(True)
    y = ops.scale_filter(x, 4.0, invert=True, dtype=torch.float32, backend=backend)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.dtype == torch.float16
    assert_close(dx, torch.full_like(dx, 0.25))


# scaled_linear -------------------------------------------------------------------------------------------


@device_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scaled_linear_matches_linear(device, backend, dtype):
    x = _rand((2, 11, 24), dtype, device).requires_grad_(True)
    w = _rand((17, 24), torch.float32, device).requires_grad_(True)  # fp32 master weights
    bias = _rand((17,), torch.float32, device).requires_grad_(True)
    g = _rand((2, 11, 17), dtype, device)
    y = ops.scaled_linear(x, w, bias, backend=backend)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, (x, w, bias), g)
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    ref = [t.detach().double().requires_grad_(True) for t in (x, w, bias)]
    wr = ref[1].to(dtype).double() if dtype != torch.float32 else ref[1]  # the rounded weights the layer uses
    yr = torch.nn.functional.linear(ref[0], wr, ref[2])
    assert_within_eager_error(
        y, yr, torch.nn.functional.linear(x.detach(), w.detach().to(dtype), bias.detach().to(dtype)), scale=4
    )
    e = torch.autograd.grad(yr, ref, g.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2}[dtype]
    for got, want in zip(grads, e, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@device_backends
def test_scaled_linear_grad_scale_and_fp32_exit(device, backend):
    """grad_scale multiplies all three gradients; with out_dtype=float32 an fp32 gradient far below fp16's
    range survives because the scale lifts it before the rounding to fp16."""
    x = _rand((9, 16), torch.float16, device).requires_grad_(True)
    w = _rand((8, 16), torch.float32, device).requires_grad_(True)
    bias = _rand((8,), torch.float32, device).requires_grad_(True)
    s = 2.0**20
    y = ops.scaled_linear(
        x, w, bias, grad_scale=torch.tensor(s, device=device), out_dtype=torch.float32, backend=backend
    )
    assert y.dtype == torch.float32
    g = _rand((9, 8), torch.float32, device, mag=2.0**-26)  # underflows to 0 in fp16 unscaled
    assert (g.half() == 0).float().mean() > 0.9
    dx, dw, db = torch.autograd.grad(y, (x, w, bias), g)
    gx = g.double() * s
    assert_close(dx, (gx @ w.detach().half().double()).half(), dtype=torch.float16, scale=10)
    torch.testing.assert_close(dw.double(), gx.t() @ x.detach().double(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(db.double(), gx.sum(0), rtol=1e-3, atol=1e-3)
    assert (dx != 0).float().mean() > 0.9


@device_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bind_linear_equals_scaled_linear(device, backend, dtype, with_bias):
    """The bound inference forward (decoding's) computes exactly what scaled_linear does, on fresh inputs of
    other values and batch sizes, from fp32 master weights, with a strided input."""
    w = _rand((19, 24), torch.float32, device)
    bias = _rand((19,), torch.float32, device) if with_bias else None
    f = ops.bind_linear(_rand((1, 1, 24), dtype, device), w, bias, backend=backend)
    for shape in ((1, 1, 24), (3, 1, 24), (5, 24)):
        x = _rand(shape, dtype, device)
        y = f(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 19)
        with torch.no_grad():
            torch.testing.assert_close(y, ops.scaled_linear(x, w, bias, backend=backend), rtol=0, atol=0)
        yr = torch.nn.functional.linear(x.double(), w.to(dtype).double(), None if bias is None else bias.double())
        assert_close(y, yr, dtype=dtype, scale=4)
    xt = _rand((24, 6), dtype, device).t()  # non-contiguous
    torch.testing.assert_close(f(xt), ops.scaled_linear(xt, w, bias, backend=backend).detach(), rtol=0, atol=0)


def test_bind_linear_bad_input():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight: expected \[out_features, 8\] for x of shape \(2, 8\), got \(4, 7\)"):
        ops.bind_linear(x, w[:, :7])
    with pytest.raises(ValueError, match=r"bias: expected shape \[4\] on cpu, got \[3\]"):
        ops.bind_linear(x, w, torch.randn(3))
    with pytest.raises(TypeError, match="x: expected .*got torch.int64"):
        ops.bind_linear(x.long(), w)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.bind_linear(x, w, backend="gpu")


# Registration, opcheck, compile --------------------------------------------------------------------------


def test_extension_loaded_and_kernels_registered():
    assert dalle_fast.extension_error is None, dalle_fast.extension_error
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CPU"), op
        if os.environ.get("DALLE_FAST_EXPECT_CUDA") == "1":
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CUDA"), op


@kernel_backends
def test_opcheck(device, backend):
    op = registered_ops(backend)
    a = torch.randn(2, 5, 7, device=device, requires_grad=True)
    b = torch.randn(7, 6, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    s = torch.tensor(0.5, device=device)
    a16 = torch.randn(9, 7, device=device).half().requires_grad_(True)
    b16 = torch.randn(7, 3, device=device).half().requires_grad_(True)
    cases = [
        (a, b, bias, 2.0, s, True),
        (a, b, None, 1.0, None, False),
        (a16, b16, None, 0.5, s, True),
        (torch.randn(4, 7, device=device), b16.detach(), None, 1.0, s, False),
    ]
    for args in cases:
        torch.library.opcheck(op["scaled_matmul"], args)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    for args in [(x, 2.0, s, True, True, torch.float16), (x, 1.0, None, False, False, torch.float32)]:
        torch.library.opcheck(op["scale_filter"], args)


@kernel_backends
def test_torch_compile_and_scale_without_recompile(device, backend):
    def step(a, b, bias, s):
        flag = torch.zeros(1, dtype=torch.int32, device=a.device)
        y = ops.scaled_matmul(a, b, bias, scale=s, filter_nonfinite=True, nonfinite_flag=flag, backend=backend)
        return (y * y).sum(), flag

    a = torch.randn(2, 7, 9, device=device, requires_grad=True)
    b = torch.randn(9, 5, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for value in (0.5, 4.0):  # a new scale value is data, not a new graph
        s = torch.tensor(value, device=device)
        with torch._dynamo.config.patch(error_on_recompile=value != 0.5):
            loss, flag = compiled(a, b, bias, s)
        grads = torch.autograd.grad(loss, (a, b, bias))
        loss_e, _ = step(a, b, bias, s)
        grads_e = torch.autograd.grad(loss_e, (a, b, bias))
        assert flag.item() == 0
        assert_close(loss, loss_e, scale=10)
        for g, ge in zip(grads, grads_e, strict=True):
            assert_close(g, ge, scale=10)


# Bad input -----------------------------------------------------------------------------------------------


@device_backends
def test_bad_input(device, backend):
    a, b = torch.randn(4, 5, device=device), torch.randn(5, 3, device=device)
    with pytest.raises(TypeError, match="a: expected a torch.Tensor"):
        ops.scaled_matmul([1.0], b, backend=backend)
    with pytest.raises(TypeError, match="a: expected float16, bfloat16, float32, float64, got torch.int64"):
        ops.scaled_matmul(a.long(), b, backend=backend)
    with pytest.raises(TypeError, match="b: expected the dtype of a"):
        ops.scaled_matmul(a.half(), b, backend=backend)
    with pytest.raises(ValueError, match=r"b: expected 5 rows \(a's last dim\), got shape \(4, 3\)"):
        ops.scaled_matmul(a, torch.randn(4, 3, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"a: expected \[..., M, K\]"):
        ops.scaled_matmul(torch.randn(5, device=device), b, backend=backend)
    with pytest.raises(ValueError, match=r"b: expected \[K, N\]"):
        ops.scaled_matmul(a, torch.randn(2, 5, 3, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"bias: expected shape \[3\], got \[4\]"):
        ops.scaled_matmul(a, b, torch.randn(4, device=device), backend=backend)
    with pytest.raises(TypeError, match="scale: expected a float or a 0-dim float32 tensor"):
        ops.scaled_matmul(a, b, scale=torch.ones(2, device=device), backend=backend)
    with pytest.raises(TypeError, match="scale: expected a float or a 0-dim float32 tensor, got str"):
        ops.scaled_matmul(a, b, scale="2", backend=backend)
    with pytest.raises(TypeError, match="nonfinite_flag: expected a one-element int32 tensor"):
        ops.scaled_matmul(a, b, nonfinite_flag=torch.zeros(1, device=device), backend=backend)
    with pytest.raises(TypeError, match="filter_nonfinite: expected a bool"):
        ops.scaled_matmul(a, b, filter_nonfinite=1, backend=backend)
    with pytest.raises(TypeError, match="dtype: expected"):
        ops.scale_filter(a, 2.0, dtype=torch.int32, backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected \[out_features, 5\]"):
        ops.scaled_linear(a, torch.randn(3, 4, device=device), backend=backend)


@kernel_backends
def test_kernel_backends_reject_what_they_cannot_serve(device, backend):
    a64 = torch.randn(4, 5, dtype=torch.float64, device=device)
    with pytest.raises(dalle_fast.BackendUnavailable, match="kernels take float16, bfloat16 or float32"):
        ops.scaled_matmul(a64, a64.t(), backend=backend)
    with pytest.raises(dalle_fast.BackendUnavailable, match="meta"):
        ops.scaled_matmul(torch.randn(2, 3, device="meta"), torch.randn(3, 2, device="meta"), backend=backend)
    op = registered_ops(backend)["scaled_matmul"]
    with pytest.raises((RuntimeError, ValueError), match="b"):
        op(torch.randn(4, 5, device=device), torch.randn(6, 2, device=device), None, 1.0, None, False)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="scale"):
        op(
            torch.randn(4, 5, device=device),
            torch.randn(5, 2, device=device),
            None,
            1.0,
            torch.ones(3, device=device),
            False,
        )


def test_fp64_goes_to_eager_automatically():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    assert_close(ops.scaled_matmul(a, b, scale=3.0), 3.0 * (a @ b))


def test_automatic_choice_and_available_backends():
    interpreter = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    assert available_backends("scaled_matmul", "cpu") == interpreter + ["cpp", "eager"]
    with pytest.raises(ValueError, match="op_name"):
        available_backends("matmul", "cpu")
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    assert torch.equal(ops.scaled_matmul(a, b, scale=2.0), ops.scaled_matmul(a, b, scale=2.0, backend="cpp"))
    with pytest.raises(dalle_fast.BackendUnavailable, match="the cuda backend serves cuda tensors, got cpu"):
        ops.scaled_matmul(a, b, backend="cuda")


def test_reference_is_the_documented_math():
    a, b, bias = torch.randn(3, 4), torch.randn(4, 2), torch.randn(2)
    out, flag = reference.scaled_matmul(a, b, bias, 2.0, torch.tensor(0.25), True)
    assert_close(out, 0.5 * (a @ b) + bias)
    assert flag.dtype == torch.int32 and flag.shape == (1,) and flag.item() == 0
