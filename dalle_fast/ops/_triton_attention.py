"""Launchers of the Triton sparse-attention kernels (kernels/attention.py). Placeholder until they land."""

import torch


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    return 64, 64


def sparse_attention_fwd(q, k, v, kv_indptr, kv_index, kv_partial, kind, text_len, grid_h, grid_w, kernel, torus,
                         scale, block_m, block_n):  # fmt: skip
    raise NotImplementedError("the Triton sparse-attention kernels are not written yet")


def sparse_attention_bwd(grad_out, q, k, v, out, lse, kv_indptr, kv_index, kv_partial, q_indptr, q_index, q_partial,
                         kind, text_len, grid_h, grid_w, kernel, torus, scale, block_m, block_n):  # fmt: skip
    raise NotImplementedError("the Triton sparse-attention kernels are not written yet")
