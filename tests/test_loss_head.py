"""The loss head on every backend: ops.linear_cross_entropy (cpp, triton under the interpreter, eager; cuda on the
GPU machine) against the dense composition F.cross_entropy(F.linear(x, W, b), t, reduction="sum") in fp64,
forward and the three gradients; odd sizes, chunks that do not divide N, strided inputs, N = 1, fp16 / bf16;
what backward keeps (no [N, V] tensor); registration, opcheck, torch.compile, dispatch and bad input.

Sizes are tiny: Triton runs in its interpreter here."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import assert_close, assert_within_eager_error

import dalle_fast
from dalle_fast import _dispatch, ops
from dalle_fast.ops import loss as loss_mod
from dalle_fast.ops.loss import registered_ops

pytestmark = pytest.mark.usefixtures("one_thread")
device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)

# (N, d, V, chunk): V past one 256-wide interpreter row block, chunks that do not divide N, chunk > N, N = 1,
# d = 1.
CASES = [
    (37, 24, 53, 7),
    (20, 17, 300, 6),
    (9, 8, 11, 100),
    (1, 5, 3, 4),
    (6, 1, 7, 4),
]


def _inputs(N, d, V, device, dtype=torch.float32, bias=True, strided=False):
    if strided:  # x transposed, weight a column slice of a wider matrix
        x = torch.randn(d, N, device=device).t()
        w = torch.randn(V, d + 3, device=device)[:, 1 : d + 1] / d**0.5
    else:
        x = torch.randn(N, d, device=device)
        w = torch.randn(V, d, device=device) / d**0.5
    x = (x * 2).to(dtype)
    w = (w * 3).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), device=device)
    return x, w, b, t


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in ts]


def _loss_and_grads(fn, x, w, b, scale=1.7):
    x, w, b = _leaves(x, w, b)
    loss = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(loss * scale, inputs)
    return [loss.detach()] + [g.detach() for g in grads]


def _dense(t):
    return lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction="sum")


def _check(got, oracle, eager, dtype, scale=10.0):
    """DESIGN section 8's rule; the floor is relative to the largest value (the loss and dW, db are long sums)."""
    for name, a, o, e in zip(("loss", "dx", "dweight", "dbias"), got, oracle, eager):
        assert a.shape == o.shape, name
        try:
            big = max(1.0, o.abs().max().item()) if o.numel() else 1.0
            assert_within_eager_error(a, o, e, dtype=dtype, scale=scale * big)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


@device_backends
@pytest.mark.parametrize("N,d,V,chunk", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_parity_fp32(device, backend, N, d, V, chunk, bias, strided):
    x, w, b, t = _inputs(N, d, V, device, bias=bias, strided=strided)
    got = _loss_and_grads(lambda x, w, b: ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk, backend=backend),
                          x, w, b)  # fmt: skip
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    oracle = _loss_and_grads(_dense(t), *_leaves(x, w, b, dtype=torch.float64))
    eager = _loss_and_grads(_dense(t), x, w, b)
    _check(got, oracle, eager, torch.float32)


@pytest.mark.parametrize("N,d,V,chunk", CASES[:3])
def test_eager_fp64(N, d, V, chunk):
    x, w, b, t = _inputs(N, d, V, "cpu", dtype=torch.float64, strided=True)
    got = _loss_and_grads(lambda x, w, b: ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk, backend="eager"),
                          x, w, b)  # fmt: skip
    want = _loss_and_grads(_dense(t), x, w, b)
    assert got[0].dtype == torch.float64
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, torch.float64, scale=10)


@device_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, backend, dtype):
    """fp16 / bf16 inputs: fp32 logits and loss, gradients in the inputs' dtype, within 2x the error of the
    dense composition run in that dtype (against fp64 on the same rounded inputs)."""
    N, d, V, chunk = 23, 16, 70, 9
    x, w, b, t = _inputs(N, d, V, device, dtype=dtype, strided=True)
    got = _loss_and_grads(lambda x, w, b: ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk, backend=backend),
                          x, w, b)  # fmt: skip
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[1:]] == [dtype] * 3
    oracle = _loss_and_grads(_dense(t), *_leaves(x, w, b, dtype=torch.float64))
    eager = _loss_and_grads(_dense(t), x, w, b)
    _check(got, oracle, eager, dtype, scale=4.0)


@device_backends
@pytest.mark.parametrize("which", ["x", "weight", "bias", "none"])
def test_only_the_gradients_asked_for(device, backend, which):
    x, w, b, t = _inputs(13, 6, 19, device)
    leaves = dict(zip(("x", "weight", "bias"), (x, w, b)))
    if which != "none":
        leaves[which] = leaves[which].clone().requires_grad_(True)
    loss = ops.linear_cross_entropy(leaves["x"], leaves["weight"], leaves["bias"], t, chunk_size=5, backend=backend)
    want = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), t, reduction="sum")
    assert_close(loss, want, torch.float32, scale=10)
    assert loss.requires_grad == (which != "none")
    if which != "none":
        (g,) = torch.autograd.grad(loss, [leaves[which]])
        ref = _leaves(x, w, b, dtype=torch.float64)
        ref_loss = F.cross_entropy(F.linear(*ref), t, reduction="sum")
        (g_ref,) = torch.autograd.grad(ref_loss, [ref[("x", "weight", "bias").index(which)]])
        assert_close(g, g_ref, torch.float32, scale=10)
    with torch.no_grad():
        assert_close(ops.linear_cross_entropy(x, w, b, t, backend=backend), want, torch.float32, scale=10)


def _saved(fn, inputs):
    """The tensors autograd saves during fn(), not counting the inputs' own storage."""
    own = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(saved.values())


@device_backends
def test_saves_no_logits(device, backend):
    """Backward keeps dx, dW and db only: nothing of the size of the [N, V] logits."""
    N, d, V = 96, 8, 120
    x, w, b, t = _inputs(N, d, V, device)
    x, w, b = _leaves(x, w, b)
    loss, saved = _saved(lambda: ops.linear_cross_entropy(x, w, b, t, chunk_size=32, backend=backend), (x, w, b, t))
    assert saved, "expected the gradients to be saved"
    assert all(s.numel() < N * V for s in saved), [tuple(s.shape) for s in saved]
    assert sum(s.numel() * s.element_size() for s in saved) <= (N * d + V * d + V) * 4
    loss.backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


@device_backends
def test_backward_twice_and_scaled(device, backend):
    """retain_graph: a second backward gives the same gradients (the saved ones are never handed out)."""
    x, w, b, t = _inputs(11, 5, 9, device)
    x, w, b = _leaves(x, w, b)
    loss = ops.linear_cross_entropy(x, w, b, t, chunk_size=4, backend=backend)
    (loss * 2).backward(retain_graph=True)
    first = [p.grad.clone() for p in (x, w, b)]
    loss.backward()
    for p, g in zip((x, w, b), first):
        assert_close(p.grad, g * 1.5)


# Registration, opcheck, compile, dispatch -----------------------------------------------------------------


def test_extension_registers_the_op():
    assert dalle_fast.extension_error is None, dalle_fast.extension_error
    for op in loss_mod.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", "CPU"), op


@kernel_backends
def test_opcheck(device, backend):
    op = registered_ops(backend)["linear_cross_entropy"]
    x, w, b, t = _inputs(7, 5, 9, device)
    x, w, b = _leaves(x, w, b)
    for args in [
        (x, w, b, t, 3, True, True, True),
        (x, w, None, t, 8, True, False, False),
        (x.detach(), w, b, t, 2, False, True, True),
        (x.detach(), w.detach(), b.detach(), t, 4, False, False, False),
    ]:
        torch.library.opcheck(op, args)


@kernel_backends
def test_torch_compile(device, backend):
    x, w, b, t = _inputs(10, 6, 13, device)

    def step(x, w, b):
        return ops.linear_cross_entropy(torch.tanh(x), w * 2, b, t, chunk_size=4, backend=backend) / 10

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got = _loss_and_grads(compiled, x, w, b)
    want = _loss_and_grads(step, x, w, b)
    for a, e in zip(got, want, strict=True):
        assert_close(a, e)


def test_available_backends_and_automatic_choice():
    assert ops.available_backends("linear_cross_entropy", "cpu") == ["triton", "cpp", "eager"]
    assert ops.available_backends("linear_cross_entropy", "meta") == ["eager"]
    x = torch.randn(3, 4)
    assert _dispatch.select("linear_cross_entropy", x.device, None, loss_mod._reasons_for(x.device, x.dtype)) == "cpp"
    x64 = x.double()
    assert ops.linear_cross_entropy(x64, torch.randn(5, 4).double(), None, torch.tensor([0, 4, 2])).dtype == x64.dtype


@device_backends
def test_model_loss_head_runs_on_the_model_backend(device, backend, monkeypatch):
    from dalle_fast.nn import DALLE, DALLEConfig

    c = DALLEConfig.tiny(n_layers=1)
    model = DALLE(c, backend=backend).to(device)
    calls = []
    real = loss_mod.linear_cross_entropy

    def spy(*args, **kw):
        calls.append(kw.get("backend"))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "linear_cross_entropy", spy)
    text = torch.randint(0, c.text_vocab, (1, c.text_len), device=device)
    image = torch.randint(0, c.image_vocab, (1, c.image_len), device=device)
    model(text, image)
    assert calls == [backend, backend]


# Bad input ---------------------------------------------------------------------------------------------


@device_backends
def test_bad_input(device, backend):
    x, w, b, t = _inputs(5, 4, 3, device)
    lce = ops.linear_cross_entropy
    with pytest.raises(ValueError, match=r"target: expected class ids in \[0, 3\), got 3"):
        lce(x, w, b, torch.tensor([0, 1, 2, 3, 0], device=device), backend=backend)
    with pytest.raises(ValueError, match=r"target: expected class ids in \[0, 3\), got -1"):
        lce(x, w, b, torch.tensor([0, -1, 2, 1, 0], device=device), backend=backend)
    with pytest.raises(ValueError, match=r"target: expected an int64 tensor \[5\]"):
        lce(x, w, b, t.int(), backend=backend)
    with pytest.raises(ValueError, match=r"target: expected an int64 tensor \[5\]"):
        lce(x, w, b, t[:4], backend=backend)
    with pytest.raises(ValueError, match=r"x: expected a 2-D tensor \[N, d\]"):
        lce(x[0], w, b, t, backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected a tensor \[V, 4\]"):
        lce(x, torch.randn(3, 5, device=device), b, t, backend=backend)
    with pytest.raises(ValueError, match=r"bias: expected a tensor \[3\]"):
        lce(x, w, torch.randn(4, device=device), t, backend=backend)
    with pytest.raises(TypeError, match="weight: expected x's dtype torch.float32, got torch.float16"):
        lce(x, w.half(), b, t, backend=backend)
    with pytest.raises(TypeError, match="x: expected float16, bfloat16, float32 or float64, got torch.int64"):
        lce(x.long(), w.long(), None, t, backend=backend)
    with pytest.raises(ValueError, match="weight: expected x's device"):
        lce(x, w.to("meta"), None, t, backend=backend)
    with pytest.raises(ValueError, match="chunk_size: expected an int >= 1, got 0"):
        lce(x, w, b, t, chunk_size=0, backend=backend)
    with pytest.raises(ValueError, match="weight: expected at least one class"):
        lce(x, w[:0], None, t, backend=backend)


@kernel_backends
def test_kernel_backends_reject_what_they_cannot_serve(device, backend):
    x, w, b, t = _inputs(5, 4, 3, device)
    with pytest.raises(dalle_fast.BackendUnavailable, match="kernels take float16, bfloat16 or float32"):
        ops.linear_cross_entropy(x.double(), w.double(), None, t, backend=backend)
    op = registered_ops(backend)["linear_cross_entropy"]
    with pytest.raises((RuntimeError, ValueError), match="target: expected an int64 tensor"):
        op(x, w, b, t.int(), 2, False, False, False)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="bias: expected"):
        op(x, w, b.half(), t, 2, False, False, False)
    # An id out of range reaching the op (under torch.compile nothing checks it) gives a NaN loss, never a
    # read or write out of bounds.
    bad = torch.tensor([0, 1, 7, 2, -4], device=device)
    loss, dx, dw, db = op(x, w, b, bad, 2, True, True, True)
    assert torch.isnan(loss) and bool(torch.isfinite(dx).all() & torch.isfinite(dw).all() & torch.isfinite(db).all())


@device_backends
def test_no_rows(device, backend):
    """N = 0: a zero loss whose gradients are zero (dx empty)."""
    x, w, b, t = _inputs(0, 4, 3, device)
    x, w, b = _leaves(x, w, b)
    loss = ops.linear_cross_entropy(x, w, b, t, backend=backend)
    dx, dw, db = torch.autograd.grad(loss, [x, w, b])
    assert loss.item() == 0 and dx.shape == (0, 4) and not dw.any() and not db.any()
