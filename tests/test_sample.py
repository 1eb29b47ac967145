"""ops.sample (issue 7): every backend draws the eager reference's ids; top-k / top-p semantics on hand-built
rows; the link to gumbel_argmax; the distribution (chi-square); determinism; bad input; opcheck and compile."""

import os

import pytest
import torch
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from scipy.stats import chisquare

import dalle_fast
from dalle_fast import ops, reference
from dalle_fast.ops.sampling import registered_ops

pytestmark = pytest.mark.usefixtures("one_thread")
device_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
kernel_backends = pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
NEG_INF = float("-inf")

# (shape, temperature, top_k, top_p, offset). V: odd and even sizes, the image vocabulary 8192, rows past
# the Triton kernel's one-chunk limit (9001 unaligned -> chunks; 4099 with offset 3 -> chunks); leading dims.
CASES = [
    ((3, 37), 1.0, None, None, 0),
    ((2, 3, 130), 0.7, 5, None, 3),
    ((4, 129), 1.3, None, 0.9, 0),
    ((3, 1000), 0.8, 50, 0.8, 8),
    ((2, 8192), 1.0, 40, 0.95, 0),
    ((2, 8192), 0.9, None, 0.5, 4),
    ((1, 9001), 1.0, 100, 0.9, 1),
    ((2, 4099), 1.0, 7, None, 3),
    ((5, 1), 1.0, 1, 0.3, 0),
]


def _logits(shape, device, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape) * scale).to(device=device, dtype=dtype)


def _draws(x, n, backend, **kw):
    """n draws from one row x: the row repeated n times (row r takes element numbers offset + r * V)."""
    return ops.sample(x.expand(n, x.shape[-1]), backend=backend, **kw)


# fp16 on every one-chunk case; the chunked (slow in the interpreter) cases in fp32.
DTYPED_CASES = [(*c, torch.float32) for c in CASES] + [(*c, torch.float16) for c in CASES if c[0][-1] <= 8192]


@device_backends
@pytest.mark.parametrize("shape,temperature,top_k,top_p,offset,dtype", DTYPED_CASES)
def test_equals_eager(device, backend, shape, temperature, top_k, top_p, offset, dtype):
    x = _logits(shape, device, dtype)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=12345, offset=offset)
    got = ops.sample(x, backend=backend, **kw)
    want = reference.sample(x.cpu(), temperature, top_k, top_p, 12345, offset)
    assert got.dtype == torch.int64 and got.shape == shape[:-1]
    assert torch.equal(got.cpu(), want)


@device_backends
def test_noncontiguous_and_bf16(device, backend):
    x = _logits((130, 6), device).t()  # [6, 130], V strided
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=2**63 + 7, offset=5)

    # The oracle runs on CPU: torch's CUDA division by a scalar multiplies by its reciprocal (not IEEE).
    def oracle(t):
        return ops.sample(t.cpu().contiguous(), backend="eager", **kw)

    assert torch.equal(ops.sample(x, backend=backend, **kw).cpu(), oracle(x))
    y = _logits((4, 5, 64), device).transpose(0, 1)  # leading dims permuted: the logical order counts
    assert torch.equal(ops.sample(y, backend=backend, **kw).cpu(), oracle(y))
    b = _logits((3, 300), device, torch.bfloat16)
    assert torch.equal(ops.sample(b, backend=backend, **kw).cpu(), oracle(b))


@device_backends
def test_is_gumbel_argmax_of_scaled_logits(device, backend):
    x = _logits((6, 333), device)
    for t in (1.0, 0.6):
        got = ops.sample(x, temperature=t, seed=99, offset=12, backend=backend).cpu()
        assert torch.equal(got, ops.gumbel_argmax(x.cpu() / t, seed=99, offset=12, backend="eager"))
    # top_k=1 is the argmax (random rows: no ties)
    assert torch.equal(ops.sample(x, top_k=1, seed=5, backend=backend), x.argmax(-1))


def _support(x, backend, n=256, **kw):
    return set(_draws(x, n, backend, seed=7, **kw).cpu().tolist())


@device_backends
def test_top_k_semantics(device, backend):
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 2.0, NEG_INF, 0.5], device=device)
    assert _support(x, backend, top_k=1) == {0, 2}  # ties at the threshold are kept
    assert _support(x, backend, top_k=2) == {0, 2}
    assert _support(x, backend, top_k=3) == {0, 2, 3, 4}
    assert _support(x, backend, top_k=7) == {0, 1, 2, 3, 4, 6}  # >= V: all; -inf never drawn
    assert _support(x, backend, top_k=100, temperature=4.0) == {0, 1, 2, 3, 4, 6}
    assert _support(x, backend, top_k=6) == {0, 1, 2, 3, 4, 6}  # the 6th largest is the 0.5


@device_backends
def test_top_p_semantics(device, backend):
    p = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.0], device=device)
    x = p.log()  # -inf for the last entry
    assert _support(x, backend, top_p=0.45) == {0}
    assert _support(x, backend, top_p=0.75) == {0, 2}
    assert _support(x, backend, top_p=0.85) == {0, 1, 2, 3}  # the tie at the smallest kept value is kept
    assert _support(x, backend, top_p=1.0) == {0, 1, 2, 3}
    assert _support(x, backend, top_p=1e-6) == {0}  # at least one entry
    # after top_k: the mass is renormalised over the kept entries (0.5 / 0.8 = 0.625 >= 0.6)
    assert _support(x, backend, top_k=2, top_p=0.6) == {0}
    assert _support(x, backend, top_k=2, top_p=0.65) == {0, 2}
    # a temperature reshapes the probabilities before top_p: at t=100 they are nearly uniform
    assert _support(x, backend, top_p=0.6, temperature=100.0) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "device,backend,n", [(d, b, 600 if b == "triton" and d == "cpu" else 4000) for d, b in DEVICE_BACKENDS]
)
@pytest.mark.parametrize("top_k,top_p", [(None, None), (4, None), (None, 0.7), (5, 0.9)])
def test_distribution_chi_square(device, backend, n, top_k, top_p):
    x = torch.tensor([1.0, 0.2, -0.5, 0.9, 0.0, -2.0, 0.4], device=device)
    t = 0.8
    ids = torch.cat([_draws(x, n, backend, temperature=t, top_k=top_k, top_p=top_p, seed=s) for s in (1, 2)])
    z = x.cpu() / t
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        keep &= z >= z.topk(top_k).values[-1]
    if top_p is not None:
        order = torch.argsort(z.masked_fill(~keep, NEG_INF), descending=True)
        probs = torch.softmax(z.masked_fill(~keep, NEG_INF), -1)[order]
        last = int((probs.cumsum(0) < top_p).sum())
        keep &= z >= z[order[last]]
    expected = torch.softmax(z.masked_fill(~keep, NEG_INF), -1).double()
    counts = torch.bincount(ids.cpu(), minlength=x.numel()).double()
    assert counts[~keep].sum() == 0
    k = keep.nonzero().flatten()
    if len(k) > 1:
        f_exp = expected[k] / expected[k].sum() * counts.sum()
        assert chisquare(counts[k].numpy(), f_exp.numpy()).pvalue > 1e-3


@device_backends
def test_deterministic_and_offsets(device, backend):
    x = _logits((4, 500), device)
    a = ops.sample(x, top_p=0.9, seed=3, offset=8, backend=backend)
    assert torch.equal(a, ops.sample(x, top_p=0.9, seed=3, offset=8, backend=backend))
    assert not torch.equal(
        torch.stack([ops.sample(x, seed=3, offset=8 + 2000 * i, backend=backend) for i in range(4)]),
        a.expand(4, 4),
    )
    torch.manual_seed(0)
    b = ops.sample(x, backend=backend)  # seed=None: drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(b, ops.sample(x, backend=backend))
    assert torch.equal(ops.sample(x, seed=torch.tensor(3), offset=8, top_p=0.9, backend=backend), a)


# Bad input -----------------------------------------------------------------------------------------------


@device_backends
def test_bad_input(device, backend):
    x = _logits((3, 10), device)
    for t in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
            ops.sample(x, temperature=t, backend=backend)
    for k in (0, -3):
        with pytest.raises(ValueError, match="top_k: expected None or an int >= 1, got"):
            ops.sample(x, top_k=k, backend=backend)
    with pytest.raises(TypeError, match="top_k: expected None or an int >= 1, got float"):
        ops.sample(x, top_k=2.0, backend=backend)
    for p in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"top_p: expected None or a number in \(0, 1\]"):
            ops.sample(x, top_p=p, backend=backend)
    with pytest.raises(TypeError, match="logits: expected float16, bfloat16 or float32, got torch.int64"):
        ops.sample(torch.ones(3, 10, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(ValueError, match="non-empty last dim"):
        ops.sample(torch.randn(3, 0, device=device), backend=backend)
    with pytest.raises(ValueError, match="seed: a tensor seed must be one integer on the CPU"):
        ops.sample(x, seed=torch.tensor(3, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="seed: a tensor seed must be one integer on the CPU"):
        ops.sample(x, seed=torch.tensor([1.0]), backend=backend)
    with pytest.raises(ValueError, match="offset: expected an integer >= 0"):
        ops.sample(x, offset=-1, backend=backend)
    if device == "cpu":  # on GPU the row's id is -1 instead (no host sync)
        bad = x.clone()
        bad[1, 4] = float("nan")
        with pytest.raises(ValueError, match=r"row \(1,\) has NaN"):
            ops.sample(bad, backend=backend)
        bad = x.clone()
        bad[2] = NEG_INF
        with pytest.raises(ValueError, match=r"row \(2,\) has only -inf"):
            ops.sample(bad, top_k=3, backend=backend)
        with pytest.raises(ValueError, match=r"\+inf"):
            ops.sample(torch.full((2, 3), 3e38, device=device), temperature=0.5, backend=backend)


@kernel_backends
def test_registered_op_marks_invalid_rows(device, backend):
    x = _logits((4, 33), device)
    x[1, 3] = float("nan")
    x[2] = NEG_INF
    x[3, 0] = float("inf")
    out = registered_ops(backend)["sample"](x, 1.0, 5, 0.9, 1, 0)
    assert out[1:].tolist() == [-1, -1, -1] and out[0] >= 0


# Registration, opcheck, compile, dispatch ----------------------------------------------------------------


def test_registered():
    assert dalle_fast.extension_error is None, dalle_fast.extension_error
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dalle_fast::sample", "CPU")
    if os.environ.get("DALLE_FAST_EXPECT_CUDA") == "1":
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dalle_fast::sample", "CUDA")


@kernel_backends
def test_opcheck(device, backend):
    op = registered_ops(backend)["sample"]
    x = _logits((3, 2, 37), device)
    for args in [(x, 1.0, 0, 1.0, 3, 1), (x.half(), 0.5, 4, 0.8, -(2**62), 0), (x.transpose(0, 1), 2.0, 37, 0.3, 1, 4)]:
        torch.library.opcheck(op, args)


@kernel_backends
def test_torch_compile(device, backend):
    op = registered_ops(backend)["sample"]

    def step(logits):
        return op(logits * 2, 0.7, 5, 0.9, 11, 4)

    x = _logits((4, 100), device)
    assert torch.equal(torch.compile(step, fullgraph=True, dynamic=False)(x), step(x))


def test_dispatch():
    interpreter = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    assert ops.available_backends("sample", "cpu") == interpreter + ["cpp", "eager"]
    x = _logits((3, 50), "cpu")
    assert torch.equal(ops.sample(x, seed=1, top_k=5), ops.sample(x, seed=1, top_k=5, backend="cpp"))
    with pytest.raises(dalle_fast.BackendUnavailable, match="the cuda backend serves cuda tensors, got cpu"):
        ops.sample(x, backend="cuda")
