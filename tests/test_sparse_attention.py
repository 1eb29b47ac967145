"""Parity of every backend of the block-sparse DALL-E attention with the dense-masked reference, and its contract.

Errors are judged by DESIGN section 8's rule for attention: against an fp64 oracle, at most twice the error of
eager PyTorch in the precision under test, plus a floor. Small grids use small tiles so that every tile class
(full, partial, skipped) and ragged edges occur; the paper's layout (T=256, 32x32, L=1279) runs with each
backend's own tiles.
"""

import pytest
import torch
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from tolerances import ELEMENTWISE, assert_within_eager_error

from dalle_fast import masks, ops
from dalle_fast.ops import attention as attn_ops
from dalle_fast.reference import dense_mask
from dalle_fast.reference import sparse_attention as reference

device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)

KINDS = ("full", "row", "column", "conv")


def _blocks(backend, small=True):
    """Small tiles where the backend allows them (more tiles, more edges); the CUDA kernels have fixed tiles."""
    if backend in ("eager", "cuda") or not small:
        return None
    return (16, 16)


def _inputs(shape, dtype, device, layout="contiguous", requires_grad=True):
    """Fresh random q, k, v [B, H, L, D] in the layout under test."""
    b, h, n, d = shape
    out = []
    for _ in range(3):
        if layout == "contiguous":
            x = torch.randn(b, h, n, d, device=device)
        elif layout == "blhd":  # a transformer's projection viewed per head
            x = torch.randn(b, n, h, d, device=device).transpose(1, 2)
        elif layout == "strided":  # a slice of a fused qkv tensor
            x = torch.randn(b, n, 3, h, d, device=device)[:, :, 1].transpose(1, 2)
        else:
            raise ValueError(layout)
        out.append(x.to(dtype).requires_grad_(requires_grad))
    return out


def _eager_low_precision(q, k, v, mask, scale):
    """Dense-masked attention computed by eager PyTorch in the inputs' own precision."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p, v)


def _check(case, device, backend, dtype=torch.float32, layout="contiguous", blocks="small", grad_layout="contiguous"):
    kind, text_len, grid, n, d = case["kind"], case["text_len"], case["grid"], case["n"], case["d"]
    kernel, variant = case.get("kernel", 11), case.get("conv_variant", "clipped")
    shape = (case.get("b", 2), case.get("h", 2), n, d)
    q, k, v = _inputs(shape, dtype, device, layout)
    kw = dict(kind=kind, text_len=text_len, grid_size=grid, kernel=kernel, conv_variant=variant)
    out = ops.sparse_attention(q, k, v, **kw, backend=backend, _blocks=_blocks(backend, blocks == "small"))
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    grad = torch.randn(shape, device=device).to(dtype)
    if grad_layout == "strided":
        grad = torch.randn(*shape[:-1], 2 * d, device=device).to(dtype)[..., ::2]
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    # fp64 oracle, and eager PyTorch in the precision under test (fp32 math for fp32 inputs)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = reference(qd, kd, vd, **kw)
    oracle_grads = torch.autograd.grad(oracle, (qd, kd, vd), grad.double())
    mask = dense_mask(kind, text_len, *grid, kernel=kernel, conv_variant=variant, seq_len=n, device=device)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    eager = _eager_low_precision(ql, kl, vl, mask, d**-0.5)
    eager_grads = torch.autograd.grad(eager, (ql, kl, vl), grad)
    assert_within_eager_error(out, oracle, eager, dtype)
    # dq and dk are sums of p (dp - delta), differences of terms as large as dv's entries: where they cancel to
    # ~0 (a query that sees one key: kernel 1, no text) the floor must follow those terms, not the result
    grad_scale = max(1.0, *(o.abs().max().item() for o in oracle_grads))
    for name, a, o, e in zip("qkv", (dq, dk, dv), oracle_grads, eager_grads):
        assert a.shape == q.shape and a.dtype == dtype, name
        assert_within_eager_error(a, o, e, dtype, scale=grad_scale)


SMALL = [
    dict(kind=kind, text_len=t, grid=g, n=t + g[0] * g[1] - cut, d=32)
    for kind in KINDS
    for t in (0, 5)
    for g in ((4, 4), (5, 7))
    for cut in (0, 3)
]
SMALL_IDS = [f"{c['kind']}-T{c['text_len']}-{c['grid'][0]}x{c['grid'][1]}-L{c['n']}" for c in SMALL]


@device_backends
@pytest.mark.parametrize("case", SMALL, ids=SMALL_IDS)
def test_parity_small(device, backend, case):
    _check(case, device, backend)


CONV = [
    dict(kind="conv", text_len=4, grid=(5, 5), n=29, d=32, kernel=3, conv_variant="torus"),
    dict(kind="conv", text_len=3, grid=(6, 7), n=45, d=32, kernel=5, conv_variant="torus"),
    dict(kind="conv", text_len=3, grid=(6, 7), n=40, d=32, kernel=5, conv_variant="clipped"),
    dict(kind="conv", text_len=0, grid=(4, 6), n=24, d=32, kernel=1),
]


@device_backends
@pytest.mark.parametrize("case", CONV, ids=lambda c: f"k{c['kernel']}-{c.get('conv_variant', 'clipped')}-L{c['n']}")
def test_parity_conv_variants(device, backend, case):
    _check(case, device, backend)


# The cuda backend serves float16 and bfloat16 only (its fp32 refusal: test_attention_cuda.py).
HEAD_DIM_CASES = [
    (device, backend, dtype)
    for device, backend in DEVICE_BACKENDS
    for dtype in (torch.float16, torch.float32)
    if not (backend == "cuda" and dtype == torch.float32)
]


@pytest.mark.parametrize("device,backend,dtype", HEAD_DIM_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("d", [32, 64, 128])
def test_parity_head_dims(device, backend, d, dtype):
    _check(dict(kind="row", text_len=5, grid=(5, 7), n=39, d=d, b=1), device, backend, dtype)


@device_backends
@pytest.mark.parametrize("layout", ["blhd", "strided"])
def test_parity_non_contiguous(device, backend, layout):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    _check(
        dict(kind="column", text_len=5, grid=(4, 5), n=25, d=32), device, backend, dtype, layout, grad_layout="strided"
    )


@device_backends
@pytest.mark.parametrize("kind", KINDS)
def test_parity_paper_layout(device, backend, kind):
    """T=256 text positions and a 32x32 grid, fed 1279 of its 1280 positions, with the backend's own tiles."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    _check(dict(kind=kind, text_len=256, grid=(32, 32), n=1279, d=32, b=1, h=1), device, backend, dtype, blocks="own")


# Contract ------------------------------------------------------------------------------------------------


@kernel_backends
def test_output_layout(device, backend):
    """out is memory [B, L, H, D] viewed as [B, H, L, D]: merging heads back is a free view."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = _inputs((2, 3, 21, 32), dtype, device, requires_grad=False)
    out = ops.sparse_attention(q, k, v, kind="row", text_len=5, grid_size=4, backend=backend)
    assert out.transpose(1, 2).is_contiguous()


@kernel_backends
def test_deterministic(device, backend):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = _inputs((2, 2, 40, 32), dtype, device)
    grad = torch.randn(q.shape, device=device).to(dtype)
    results = []
    for _ in range(2):
        out = ops.sparse_attention(q, k, v, kind="conv", text_len=5, grid_size=(5, 7), kernel=3, backend=backend,
                                   _blocks=_blocks(backend))  # fmt: skip
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@kernel_backends
def test_no_dense_scores(device, backend):
    """No [L, L] tensor is allocated by the kernel paths, forward or backward (the layout is cached)."""
    if device != "cpu":
        pytest.skip("allocation sizes are read from the CPU profiler")
    n = 1279
    q, k, v = _inputs((1, 1, n, 32), torch.float32, device)
    kw = dict(kind="row", text_len=256, grid_size=32, backend=backend)
    ops.sparse_attention(q, k, v, **kw).sum().backward()  # warms the layout cache
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.sparse_attention(q, k, v, **kw).sum().backward()
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < n * n, f"an allocation of {largest} bytes (an [L, L] bool mask is {n * n})"


def _op_args(device, backend, dtype):
    q, k, v = _inputs((2, 2, 25, 32), dtype, device)
    bm, bn = _blocks(backend) or attn_ops.block_sizes(backend, 32, dtype)
    return (q, k, v, backend, masks.KINDS.index("conv"), 5, 4, 5, 3, False, 32**-0.5, bm, bn)


@kernel_backends
def test_opcheck(device, backend):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention, _op_args(device, backend, dtype))
    if backend in ("cpp", "cuda"):  # the C++ kernel ops themselves, with a layout (not differentiable themselves)
        q, k, v, _, kind, t, gh, gw, kern, torus, scale, bm, bn = _op_args(device, backend, dtype)
        q, k, v = q.detach(), k.detach(), v.detach()
        lay = masks.tile_layout("conv", t, gh, gw, block_m=bm, block_n=bn, seq_len=25, kernel=kern, device=device)
        fwd_args = (q, k, v, lay.kv_indptr, lay.kv_index, lay.kv_partial, kind, t, gh, gw, kern, torus, scale, bm, bn)
        torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_fwd, fwd_args)
        out, lse = torch.ops.dalle_fast.sparse_attention_fwd(*fwd_args)
        bwd_args = (torch.randn_like(out), q, k, v, out, lse, lay.kv_indptr, lay.kv_index, lay.kv_partial,
                    lay.q_indptr, lay.q_index, lay.q_partial, kind, t, gh, gw, kern, torus, scale, bm, bn)  # fmt: skip
        torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_bwd, bwd_args)


@kernel_backends
def test_torch_compile(device, backend):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = _inputs((1, 2, 21, 32), dtype, device)

    def step(q, k, v):
        out = ops.sparse_attention(q, k, v, kind="column", text_len=5, grid_size=4, backend=backend)
        return (out.float() ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = step(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v))
    rtol, atol = ELEMENTWISE[dtype]
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# Bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(kind="diagonal"), "kind: expected one of"),
        (dict(kernel=4), "kernel: expected an odd int"),
        (dict(conv_variant="wrap"), "conv_variant: expected one of"),
        (dict(grid_size=(4, 0)), "grid_w: expected an int >= 1"),
        (dict(grid_size=(4, 4, 4)), "grid_size: expected an int or a pair"),
        (dict(text_len=-1), "text_len: expected an int >= 0"),
        (dict(text_len=2), r"sequence length L in \[1, text_len \+ grid_h \* grid_w = 18\]"),
        (dict(scale=float("nan")), "scale: expected a finite float"),
        (dict(backend="gpu"), "backend: expected one of"),
    ],
)
def test_bad_arguments(change, match):
    q = torch.randn(1, 2, 21, 32)
    kw = dict(kind="row", text_len=5, grid_size=4) | change
    with pytest.raises((ValueError, TypeError), match=match):
        ops.sparse_attention(q, q, q, **kw)


def test_bad_tensors():
    q = torch.randn(1, 2, 21, 32)
    kw = dict(kind="row", text_len=5, grid_size=4)
    with pytest.raises(ValueError, match=r"k: expected the shape of q \(1, 2, 21, 32\), got \(1, 2, 20, 32\)"):
        ops.sparse_attention(q, q[:, :, :20], q, **kw)
    with pytest.raises(TypeError, match="v: expected q's dtype torch.float32, got torch.float16"):
        ops.sparse_attention(q, q, q.half(), **kw)
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions \[B, H, L, D\], got shape \(2, 21, 32\)"):
        ops.sparse_attention(q[0], q[0], q[0], **kw)
    with pytest.raises(TypeError, match="q: expected float16, bfloat16, float32 or float64, got torch.int64"):
        ops.sparse_attention(q.long(), q.long(), q.long(), **kw)
    with pytest.raises(ops.BackendUnavailable, match=r"head sizes \(32, 64, 128\), got 48"):
        q48 = torch.randn(1, 2, 21, 48)
        ops.sparse_attention(q48, q48, q48, **kw, backend="cpp")
    with pytest.raises(ops.BackendUnavailable, match="the cpp backend serves cpu tensors, got meta"):
        m = q.to("meta")
        ops.sparse_attention(m, m, m, **kw, backend="cpp")


def test_eager_serves_any_head_size():
    q, k, v = _inputs((1, 2, 21, 48), torch.float32, "cpu")
    out = ops.sparse_attention(q, k, v, kind="conv", text_len=5, grid_size=4)
    assert out.shape == q.shape


def test_cpp_portable_path_matches():
    """DALLE_FAST_CPU_PORTABLE=1 (read once per process) forces the plain C++ loops instead of the AVX-512 or
    AVX2 micro-kernels (whichever this CPU runs): both paths must agree with the reference."""
    import os
    import subprocess
    import sys

    script = """
import torch
from dalle_fast import ops
from dalle_fast.reference import sparse_attention as reference
torch.manual_seed(0)
worst = 0.0
for kind, cut in (("row", 0), ("column", 3), ("conv", 1), ("full", 2)):
    q, k, v = (torch.randn(1, 2, 40 - cut, 32, requires_grad=True) for _ in range(3))
    kw = dict(kind=kind, text_len=5, grid_size=(5, 7), kernel=3)
    out = ops.sparse_attention(q, k, v, **kw, backend="cpp", _blocks=(16, 16))
    ref = reference(*(t.double() for t in (q, k, v)), **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        worst = max(worst, (a.double() - b).abs().max().item())
print(worst)
"""
    results = {}
    for portable in ("0", "1"):
        env = dict(os.environ)
        env.pop("DALLE_FAST_CPU_PORTABLE", None)
        if portable == "1":
            env["DALLE_FAST_CPU_PORTABLE"] = "1"
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        results[portable] = float(out.stdout.split()[-1])
    assert results["0"] < 1e-5 and results["1"] < 1e-5, results
