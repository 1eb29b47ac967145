"""Sparse-attention family benchmarks: dalle_fast.ops.sparse_attention at the paper's shape, each mask kind.

Shape: T=256 text positions + a 32x32 image grid (L=1280), head size 64. GPU: B=8, H=16, bfloat16. CPU: B=1,
H=4, float32. Modes: fwd (no autograd graph) and fwd+bwd (one forward and autograd.grad of q, k, v).

Backends: our kernel backends for the device, and the peers measured side by side:
    sdpa_masked   torch's scaled_dot_product_attention with the dense bool mask (what dense implementations do)
    sdpa_causal   scaled_dot_product_attention(is_causal=True): dense causal work, no DALL-E mask (on GPU forced
                  to the flash backend: the best dense kernel)
    flex          torch.compile(flex_attention) with a block mask built from dalle_fast.masks.mask_mod (on CPU
                  FlexAttention has no backward: forward only)

Work counted (flops = 4 * B * H * D per query-key pair forward: two GEMMs; backward 2.5x that: five GEMMs):
    TFLOP/s      on the pairs the mask allows (the minimum work)
    TFLOP/s on computed tiles (tflops_computed)  on the pairs of the tiles our kernels visit (for sdpa_causal:
                  the causal pairs, its own work); computed_fraction = visited tiles / all tiles.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import harness

FAMILY = "attention"
TEXT_LEN, GRID = 256, (32, 32)
HEAD_DIM = 64
SHAPES = {"cuda": (8, 16), "cpu": (1, 4)}  # (B, H)
SMOKE = dict(text_len=8, grid=(4, 4), b=1, h=2)
KINDS = ("full", "row", "column", "conv")
MODES = ("fwd", "fwd+bwd")
GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)
PEERS = (
    ("sdpa_masked", "masked", "mask"),
    ("flex", "flex", "flex"),
    ("sdpa_causal", "causal", "caus"),
)
BWD_FACTOR = 2.5


def flops_per_pair(head_dim: int, mode: str) -> float:
    fwd = 4 * head_dim
    return fwd * (1 + BWD_FACTOR) if mode == "fwd+bwd" else fwd


def layout_for(kind, text_len, grid, seq_len, backend, dtype):
    from dalle_fast import masks
    from dalle_fast.ops import attention

    bm, bn = attention.block_sizes(backend, HEAD_DIM, dtype) if backend in ("cpp", "cuda", "triton") else (64, 64)
    return masks.tile_layout(kind, text_len, *grid, block_m=bm, block_n=bn, seq_len=seq_len)


# --------------------------------------------------------------------------------------------- callables

_flex_compiled = None


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def attention_callable(backend, kind, text_len, grid, seq_len, device):
    from dalle_fast import masks, ops

    if backend == "sdpa_masked":
        mask = masks.dense_mask(kind, text_len, *grid, device=device)[:seq_len, :seq_len]
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "sdpa_causal":
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash(q, k, v):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            return flash
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        mod = masks.mask_mod(kind, text_len, *grid)
        block_mask = create_block_mask(mod, None, None, seq_len, seq_len, device=str(device))
        f = _flex()
        return lambda q, k, v: f(q, k, v, block_mask=block_mask)
    return lambda q, k, v: ops.sparse_attention(q, k, v, kind=kind, text_len=text_len, grid_size=grid, backend=backend)


def make_case(backend, kind, mode, shape, dtype, text_len, grid, device):
    def make():
        f = attention_callable(backend, kind, text_len, grid, shape[2], device)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(3))
        if mode == "fwd":
            return lambda: f(q, k, v)
        for t in (q, k, v):
            t.requires_grad_(True)
        g = torch.randn(shape, device=device, generator=gen).to(dtype)
        return lambda: torch.autograd.grad(f(q, k, v), (q, k, v), g)

    return make


# ----------------------------------------------------------------------------------------------- suite


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False):
    if smoke:
        t, grid, b, h = SMOKE["text_len"], SMOKE["grid"], SMOKE["b"], SMOKE["h"]
    else:
        (b, h), t, grid = SHAPES[device.type], TEXT_LEN, GRID
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = t + grid[0] * grid[1]
    return [
        {"kind": kind, "mode": mode, "shape": (b, h, n, HEAD_DIM), "dtype": dtype, "text_len": t, "grid": grid}
        for kind in KINDS
        for mode in MODES
    ]


def case_id(c: dict) -> str:
    return f"{c['kind']}-{c['mode']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}"


def our_backends(device: torch.device) -> list[str]:
    from dalle_fast.ops import attention

    q = torch.empty(1, 1, 1, HEAD_DIM, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [b for b in attention.available_backends(q) if b != "eager"]


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    device = suite.device
    kind, mode, shape, dtype, t, grid = c["kind"], c["mode"], c["shape"], c["dtype"], c["text_len"], c["grid"]
    b, h, n, d = shape
    recs = []
    for backend in our_backends(device) + [p for p, _, _ in PEERS]:
        common = dict(op="sparse_attention", backend=backend, dtype=dtype, shape=shape, mode=mode,
                      variant={"kind": kind})  # fmt: skip
        if backend == "flex" and mode != "fwd" and device.type == "cpu":
            recs.append(suite.skip(**common, reason="FlexAttention has no backward on CPU"))
            continue
        if backend == "flex" and suite.smoke:
            recs.append(suite.skip(**common, reason="smoke run: no FlexAttention compile"))
            continue
        lay = layout_for(kind, t, grid, n, backend, dtype)
        allowed = lay.allowed_pairs()
        per_pair = flops_per_pair(d, mode) * b * h
        computed = n * (n + 1) // 2 if backend == "sdpa_causal" else lay.computed_pairs()
        rec = suite.measure(
            **common,
            make=make_case(backend, kind, mode, shape, dtype, t, grid, device),
            nbytes=(4 if mode == "fwd" else 11) * b * h * n * d * dtype.itemsize,  # q k v o (+ do, dq dk dv, reads)
            flops=int(per_pair * allowed),
        )
        if rec["status"] == "ok":
            rec["computed_fraction"] = None if backend.startswith("sdpa") else lay.computed_fraction
            rec["tflops_computed"] = per_pair * computed / rec["median_s"] / 1e12
        recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------- goals


def _goal(name, values, limit, fmt="x"):
    if not values:
        return {"goal": name, "measured": "n/a", "target": f">= {limit}{fmt}", "status": "N/A",
                "detail": "no successful records in this run"}  # fmt: skip
    worst, label = min(values)
    return {
        "goal": name,
        "measured": f"{worst:.2f}{fmt}",
        "target": f">= {limit}{fmt}",
        "status": "PASS" if worst >= limit else "MISS",
        "detail": "; ".join(f"{lab} {v:.2f}" for v, lab in sorted(values, key=lambda t: t[1])),
    }


def goals(records: list[dict], kind: str) -> list[dict]:
    ok = [r for r in records if r.get("status") == "ok"]

    def ratios(backend, mode, key, kinds):
        mine = [r for r in ok if r["backend"] == backend and r["mode"] == mode and r["variant"]["kind"] in kinds]
        return [(r[key], r["variant"]["kind"]) for r in mine if key in r]

    sparse = ("row", "column", "conv")
    rows = []
    if kind == "cpu":
        for b in CPU_BACKENDS:
            rows.append(_goal(f"{b} fwd+bwd speed-up vs masked SDPA (row, column, conv)",
                              ratios(b, "fwd+bwd", "speedup_vs_masked", sparse), 2.0))  # fmt: skip
            rows.append(_goal(f"{b} fwd speed-up vs compiled FlexAttention (row, column, conv)",
                              ratios(b, "fwd", "speedup_vs_flex", sparse), 1.2))  # fmt: skip
        return rows
    flash = {(r["variant"]["kind"], r["mode"]): r for r in ok if r["backend"] == "sdpa_causal"}
    for b in GPU_BACKENDS:
        for mode in MODES:
            rows.append(_goal(f"{b} {mode} speed-up vs compiled FlexAttention (every kind)",
                              ratios(b, mode, "speedup_vs_flex", KINDS), 1.3))  # fmt: skip
            eff = [
                (r["tflops_computed"] / flash[(r["variant"]["kind"], mode)]["tflops_computed"], r["variant"]["kind"])
                for r in ok
                if r["backend"] == b and r["mode"] == mode and (r["variant"]["kind"], mode) in flash
            ]
            rows.append(_goal(f"{b} {mode} TFLOP/s on computed tiles / flash SDPA's (causal)", eff, 0.8))
    return rows


# ----------------------------------------------------------------------------------------------- runner


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    repeats, warmup, notes = None, None, []
    if harness.quick_gpu(s):
        repeats, warmup = s["repeats"] or harness.QUICK_GPU_REPEATS, harness.QUICK_GPU_WARMUP
        notes.append(f"quick mode: {repeats} repeats after {warmup} warm-up calls")
    return harness.family_suite(FAMILY, s, repeats=repeats, warmup=warmup, notes=notes, peers=PEERS)


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
