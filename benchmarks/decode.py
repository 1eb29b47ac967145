"""Decoding-attention family benchmarks: one decode step of dalle_fast.ops.sparse_decode_attention at the paper's
layout, each mask kind, against attention over a dense cache.

Shape: T=256 text positions + a 32x32 image grid (L = Lmax = 1280), B=16, H=16, D=64, one query (n = 1) at a
late position (POSITION = 1270: image row 31, column 22). GPU: bfloat16; CPU: float32. The caches are
[B, Lmax, H, D] tensors viewed as [B, H, Lmax, D] (a transformer's KV cache), as the model passes them.

Backends: our kernel backends for the device, and the peers measured side by side:
    sdpa_dense    scaled_dot_product_attention of the query over every cached key 0..p, no mask: what a
                  dense-cache decoder does (the issue's "dense cache" baseline; it ignores the layer's mask)
    sdpa_masked   the same with the layer's mask row as a bool mask (dense work, our semantics)

Work counted (the minimum for the op: the allowed keys only): bytes = the allowed keys' K and V rows + q + out;
flops = 4 * B * H * D per allowed key (two dot products). Allowed keys at p = 1270: full 1271, row 289,
column 288, conv (11x11 clipped) 316.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import harness

FAMILY = "decode"
TEXT_LEN, GRID = 256, (32, 32)
HEAD_DIM = 64
SHAPE = (16, 16)  # (B, H)
POSITION = 1270
SMOKE = dict(text_len=8, grid=(4, 4), b=1, h=2, position=21)
KINDS = ("full", "row", "column", "conv")
GPU_BACKENDS = ("cuda", "triton")
PEERS = (("sdpa_dense", "dense", "dense"), ("sdpa_masked", "masked", "mask"))


def allowed_count(kind, text_len, grid, position) -> int:
    from dalle_fast.reference import decode as ref

    return sum(c for _, c, _ in ref.key_ranges(kind, text_len, *grid, position))


def decode_callable(backend, kind, text_len, grid, position, device):
    from dalle_fast import ops
    from dalle_fast.reference import dense_mask

    n_keys = position + 1
    if backend == "sdpa_dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :n_keys], v[:, :, :n_keys])
    if backend == "sdpa_masked":
        mask = dense_mask(kind, text_len, *grid, device=device)[position : position + 1, :n_keys]
        return lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :n_keys], v[:, :, :n_keys], attn_mask=mask)
    return lambda q, k, v: ops.sparse_decode_attention(
        q, k, v, kind=kind, position=position, text_len=text_len, grid_size=grid, backend=backend
    )


def make_case(backend, kind, shape, lmax, dtype, text_len, grid, position, device):
    def make():
        f = decode_callable(backend, kind, text_len, grid, position, device)
        b, h, n, d = shape
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(shape, device=device, generator=gen).to(dtype)
        k, v = (torch.randn(b, lmax, h, d, device=device, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))

        def step():
            with torch.inference_mode():
                return f(q, k, v)

        return step

    return make


# ----------------------------------------------------------------------------------------------- suite


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False):
    if smoke:
        t, grid, b, h, p = SMOKE["text_len"], SMOKE["grid"], SMOKE["b"], SMOKE["h"], SMOKE["position"]
    else:
        (b, h), t, grid, p = SHAPE, TEXT_LEN, GRID, POSITION
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lmax = t + grid[0] * grid[1]
    return [
        {"kind": kind, "shape": (b, h, 1, HEAD_DIM), "lmax": lmax, "dtype": dtype, "text_len": t, "grid": grid,
         "position": p}
        for kind in KINDS
    ]  # fmt: skip


def case_id(c: dict) -> str:
    return f"{c['kind']}-p{c['position']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}"


def our_backends(device: torch.device) -> list[str]:
    from dalle_fast.ops import decode

    q = torch.empty(1, 1, 1, HEAD_DIM, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [b for b in decode.available_backends(q) if b != "eager"]


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    device = suite.device
    kind, shape, dtype, t, grid, p = c["kind"], c["shape"], c["dtype"], c["text_len"], c["grid"], c["position"]
    b, h, n, d = shape
    keys = allowed_count(kind, t, grid, p)
    recs = []
    for backend in our_backends(device) + [peer for peer, _, _ in PEERS]:
        rec = suite.measure(
            op="sparse_decode_attention", backend=backend, dtype=dtype, shape=shape, mode="fwd",
            variant={"kind": kind, "position": p},
            make=make_case(backend, kind, shape, c["lmax"], dtype, t, grid, p, device),
            nbytes=(2 * keys + 2) * b * h * d * dtype.itemsize,
            flops=4 * b * h * d * keys,
        )  # fmt: skip
        if rec["status"] == "ok":
            rec["allowed_keys"] = keys
            rec["dense_keys"] = p + 1
        recs.append(rec)
    return recs


def goals(records: list[dict], kind: str) -> list[dict]:
    """No goal of its own: the issue's goals are the model's images per second (the lead's benchmark)."""
    return []


# ----------------------------------------------------------------------------------------------- runner


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    repeats, warmup = None, None
    notes = [f"one decode step (n = 1) at position {SMOKE['position'] if s['smoke'] else POSITION}"]
    if s["device"].type == "cpu" and not s["smoke"]:
        repeats, warmup = s["repeats"] or 10, 2
        notes.append("cpu: median of 10 after 2 warm-up calls")
    if harness.quick_gpu(s):
        repeats, warmup = s["repeats"] or harness.QUICK_GPU_REPEATS, harness.QUICK_GPU_WARMUP
        notes.append(f"quick mode: {repeats} repeats after {warmup} warm-up calls")
    return harness.family_suite(FAMILY, s, repeats=repeats, warmup=warmup, notes=notes, peers=PEERS)


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
