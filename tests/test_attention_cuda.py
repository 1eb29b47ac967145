"""The CUDA C++ sparse-attention kernels' own contract (csrc/cuda/attention.cu), beyond the parity suite in
test_sparse_attention.py: the raw ops' input checks, the launch paths a parity test does not reach (grid-stride
over B*H > 65535, inputs copied for the vector loaders), bf16 at every head size on a multi-tile layout, and
bitwise determinism across many tiles. Collected only where the suite runs on cuda
(DALLE_FAST_TEST_DEVICES=cuda; see conftest.py).
"""

import pytest
import torch
from test_sparse_attention import _check
from tolerances import assert_within_eager_error

from dalle_fast import masks, ops
from dalle_fast.reference import dense_mask
from dalle_fast.reference import sparse_attention as reference

KIND_ID = {k: i for i, k in enumerate(masks.KINDS)}


def _fwd_args(q, kind="row", text_len=5, grid=(4, 4), blocks=(64, 64), kernel=11):
    lay = masks.tile_layout(kind, text_len, *grid, block_m=blocks[0], block_n=blocks[1], seq_len=q.shape[2],
                            kernel=kernel, device=q.device)  # fmt: skip
    return (q, q, q, lay.kv_indptr, lay.kv_index, lay.kv_partial, KIND_ID[kind], text_len, *grid, kernel, False,
            q.shape[-1] ** -0.5, *blocks)  # fmt: skip


def test_raw_op_refuses_fp32():
    q = torch.randn(1, 2, 21, 32, device="cuda")
    with pytest.raises(RuntimeError, match="q: expected float16 or bfloat16.*triton backend serves float32"):
        torch.ops.dalle_fast.sparse_attention_fwd(*_fwd_args(q))


def test_raw_op_refuses_other_tiles():
    q = torch.randn(1, 2, 21, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"block_m, block_n: the cuda kernels use 64 x 64 tiles.*got 16 x 16"):
        torch.ops.dalle_fast.sparse_attention_fwd(*_fwd_args(q, blocks=(16, 16)))


def test_raw_op_refuses_bad_layout_and_head_size():
    q = torch.randn(1, 2, 21, 32, device="cuda", dtype=torch.float16)
    args = list(_fwd_args(q))
    args[3] = torch.zeros(5, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=r"kv_indptr: expected n_q_tiles \+ 1 = 2 entries.*got 5"):
        torch.ops.dalle_fast.sparse_attention_fwd(*args)
    args = list(_fwd_args(q))
    args[4] = args[4].long()
    with pytest.raises(RuntimeError, match="kv_index: expected int32, got Long"):
        torch.ops.dalle_fast.sparse_attention_fwd(*args)
    q48 = torch.randn(1, 2, 21, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head size D .* of 32, 64 or 128, got 48"):
        torch.ops.dalle_fast.sparse_attention_fwd(*_fwd_args(q48))


def test_raw_op_empty():
    q = torch.randn(0, 2, 21, 32, device="cuda", dtype=torch.float16)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(*_fwd_args(q))
    assert out.shape == q.shape and lse.shape == (0, 2, 21)


def _check_grads(q, k, v, grad, kind, text_len, grid, kernel=11):
    kw = dict(kind=kind, text_len=text_len, grid_size=grid, kernel=kernel)
    out = ops.sparse_attention(q, k, v, **kw, backend="cuda")
    grads = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = reference(qd, kd, vd, **kw)
    oracle_grads = torch.autograd.grad(oracle, (qd, kd, vd), grad.double())
    mask = dense_mask(kind, text_len, *grid, kernel=kernel, seq_len=q.shape[2], device=q.device)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    s = torch.matmul(ql, kl.transpose(-1, -2)) * q.shape[-1] ** -0.5
    eager = torch.matmul(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1), vl)
    eager_grads = torch.autograd.grad(eager, (ql, kl, vl), grad)
    assert_within_eager_error(out, oracle, eager, q.dtype)
    for a, o, e in zip(grads, oracle_grads, eager_grads):
        assert_within_eager_error(a, o, e, q.dtype, scale=max(1.0, o.abs().max().item()))
    return out, grads


@pytest.mark.parametrize("d", [32, 64, 128])
def test_bf16_multi_tile(d):
    """Column layers fed a prefix: absent rows scattered through the processing order, several 64-tiles."""
    q, k, v = (torch.randn(1, 2, 155, d, device="cuda").bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(q.shape, device="cuda").bfloat16()
    _check_grads(q, k, v, grad, "column", 16, (12, 12))


def test_many_heads_grid_stride():
    """B * H above the 65535 blocks of grid.y: the kernels loop over (b, h)."""
    q, k, v = (torch.randn(70000, 1, 3, 32, device="cuda").half().requires_grad_() for _ in range(3))
    grad = torch.randn(q.shape, device="cuda").half()
    _check_grads(q, k, v, grad, "full", 2, (1, 1))


def test_unaligned_inputs_are_copied():
    """A storage offset that breaks 16-byte alignment takes the copy path and gives the same bits."""
    shape = (2, 3, 70, 64)
    n = torch.Size(shape).numel()
    buf = torch.randn(3, n + 1, device="cuda").half()
    q, k, v = (buf[i, 1:].view(shape) for i in range(3))  # 2-byte offset: not 16-byte aligned
    assert q.data_ptr() % 16 != 0
    kw = dict(kind="conv", text_len=6, grid_size=8, kernel=5, backend="cuda")
    a = ops.sparse_attention(q, k, v, **kw)
    b = ops.sparse_attention(q.contiguous().clone(), k.clone(), v.clone(), **kw)
    assert torch.equal(a, b)


def test_deterministic_paper_layout():
    q, k, v = (torch.randn(1, 2, 1279, 64, device="cuda").half().requires_grad_() for _ in range(3))
    grad = torch.randn(q.shape, device="cuda").half()
    runs = []
    for _ in range(2):
        out = ops.sparse_attention(q, k, v, kind="row", text_len=256, grid_size=32, backend="cuda")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_parity_bf16(backend):
    _check(dict(kind="conv", text_len=5, grid=(5, 7), n=40, d=64), "cuda", backend, torch.bfloat16)


def test_cuda_refuses_fp32():
    q = torch.randn(1, 1, 8, 32, device="cuda")
    with pytest.raises(ops.BackendUnavailable, match="float16 and bfloat16"):
        ops.sparse_attention(q, q, q, kind="row", text_len=4, grid_size=2, backend="cuda")
