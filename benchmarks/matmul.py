"""Scaled matmul family benchmarks: scaled_matmul with its fused epilogue, and the per-resblock scheme's cost.

Cases
    scaled_matmul fwd, out = s * (a @ b) + bias with the non-finite filter and flag (s a 0-dim device tensor),
        on the GEMMs of a transformer block: tokens x d -> d (projections), d -> 4d and 4d -> d (MLP), for
        d_model 1024, 2048, 3968 at 8192 tokens (GPU); fp16 and bf16 (GPU), fp32 and bf16 (CPU); plus one
        epilogue-bound GEMM, tokens x 64 -> 4 d (d the first d_model), where the output dominates the work and
        the epilogue's cost shows (the transformer GEMMs are GEMM-bound on a CPU: the epilogue is a few %).
        Peers measured side by side: "torch" = the eager sequence torch.matmul(a, b) * s + bias, isfinite,
        where (what the fused epilogue replaces) and "torch.matmul" = the plain GEMM alone (cuBLAS on GPU).
    resblock fwd+bwd of an fp16 MLP block (ScaledLinear d -> 4d, GELU, ScaledLinear 4d -> d) on the fp32
        residual stream, "per-resblock" (ScaledResidual: scaled exit through the output projection, fused
        unscale + filter + flag at the entry) against "plain-fp16" (the same block, plain casts, no scaling).
        The attention half of a transformer block is not included (issue 3 delivers it).

CPU runs use fewer tokens (CPU_TOKENS) and d_model 1024 only (CPU_DMODELS), fp32 and bf16: torch's fp16 GEMM on
CPU is a slow reference loop (~40 s for 2048 x 1024 x 4096 on 2 cores), which would make the eager peer
meaningless; the records say so.

Minimum bytes and flops of scaled_matmul: read a, b and bias, write out: (M K + K N + M N + N) e bytes;
2 M N K flops. resblock: the two GEMMs' forward and backward flops (3 x 2 x 2 x T x d x 4d).
"""

from __future__ import annotations

import sys

import torch

from . import harness

FAMILY = "matmul"
TOKENS = 8192
DMODELS = (1024, 2048, 3968)
QUICK_DMODELS = (1024, 3968)
CPU_TOKENS = 2048
CPU_DMODELS = (1024,)
SMOKE_TOKENS, SMOKE_DMODELS = 64, (32,)
GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)
PEER_MATMUL = "torch.matmul"
EPILOGUE = {"epilogue": "scale+bias+filter"}
# The peers whose ratios the harness computes per case: (backend, key of speedup_vs_<key>, column label).
PEERS = ((harness.PEER_EAGER, "torch", "vs eager"), (PEER_MATMUL, "matmul", "vs mm"))
SCALE = 0.5
EPILOGUE_K = 64  # the epilogue-bound case: tokens x 64 -> 4 d, where the output dominates the work


def gemm_shapes(tokens: int, d: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of a transformer block's GEMMs: projection, MLP up, MLP down."""
    return [(tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d)]


def cost(M: int, K: int, N: int, dtype: torch.dtype) -> tuple[int, int]:
    e = torch.empty((), dtype=dtype).element_size()
    return (M * K + K * N + M * N + N) * e, 2 * M * N * K


# --------------------------------------------------------------------------------------------- callables


def _eager_sequence(a, b, bias, s):
    y = torch.matmul(a, b) * s + bias
    return torch.where(torch.isfinite(y), y, torch.zeros((), dtype=y.dtype, device=y.device))


def make_matmul(backend: str, M: int, K: int, N: int, dtype: torch.dtype, device: torch.device):
    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(M, K, device=device, generator=gen).to(dtype)
        b = (torch.randn(K, N, device=device, generator=gen) / K**0.5).to(dtype)
        bias = torch.randn(N, device=device, generator=gen).to(dtype)
        s = torch.tensor(SCALE, device=device)
        if backend == harness.PEER_EAGER:
            return lambda: _eager_sequence(a, b, bias, s)
        if backend == PEER_MATMUL:
            return lambda: torch.matmul(a, b)
        from dalle_fast import ops

        flag = torch.zeros(1, dtype=torch.int32, device=device)
        return lambda: ops.scaled_matmul(
            a, b, bias, scale=s, filter_nonfinite=True, nonfinite_flag=flag, backend=backend
        )

    return make


def make_resblock(backend: str, scheme: str, tokens: int, d: int, dtype: torch.dtype, device: torch.device):
    def make():
        from torch import nn

        from dalle_fast.amp import PerResblockGradScaler, ScaledResidual
        from dalle_fast.nn import ScaledLinear

        torch.manual_seed(0)
        up = ScaledLinear(d, 4 * d, device=device, compute_dtype=dtype, backend=backend)
        down = ScaledLinear(4 * d, d, device=device, compute_dtype=dtype, backend=backend)
        block = nn.Sequential(up, nn.GELU(), down)
        if scheme == "per-resblock":
            scaler = PerResblockGradScaler(1, device=device)
            layer = ScaledResidual(block, scaler, 0, out_proj=down, compute_dtype=dtype, backend=backend)
        else:

            def layer(x):
                return x + block(x.to(dtype)).float()

        x = torch.randn(tokens, d, device=device, requires_grad=True)
        g = torch.randn(tokens, d, device=device)
        params = [x, *block.parameters()]
        return lambda: torch.autograd.grad(layer(x), params, g)

    return make


# ----------------------------------------------------------------------------------------------- suite


def dtypes_for(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float16] if quick else [torch.float16, torch.bfloat16]
    return [torch.float32] if quick else [torch.float32, torch.bfloat16]


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False) -> list[dict]:
    if smoke:
        tokens, dmodels = SMOKE_TOKENS, SMOKE_DMODELS
    elif device.type == "cpu":
        tokens, dmodels = CPU_TOKENS, CPU_DMODELS
    else:
        tokens, dmodels = TOKENS, QUICK_DMODELS if quick else DMODELS
    out = []
    for d in dmodels:
        for dtype in dtypes_for(device, quick):
            for M, K, N in gemm_shapes(tokens, d):
                out.append({"op": "scaled_matmul", "shape": (M, K, N), "dtype": dtype, "mode": "fwd", "d": d})
    for dtype in dtypes_for(device, quick):  # epilogue-bound: a short K makes the GEMM cheap next to the output
        shape = (tokens, EPILOGUE_K, 4 * dmodels[0])
        out.append({"op": "scaled_matmul", "shape": shape, "dtype": dtype, "mode": "fwd", "d": dmodels[0]})
    res_dtypes = [torch.float16] if device.type == "cuda" or smoke else [torch.bfloat16]
    for d in dmodels:
        for dtype in res_dtypes:
            out.append({"op": "resblock", "shape": (tokens, d), "dtype": dtype, "mode": "fwd+bwd", "d": d})
    return out


def case_id(c: dict) -> str:
    return f"{c['op']}-{c['mode']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}"


def our_backends(device: torch.device) -> list[str]:
    from dalle_fast.ops.matmul import available_backends

    want = GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    return [b for b in available_backends("scaled_matmul", device) if b in want]


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    device = suite.device
    dtype, mode = c["dtype"], c["mode"]
    recs = []
    if c["op"] == "scaled_matmul":
        M, K, N = c["shape"]
        nbytes, flops = cost(M, K, N, dtype)
        for backend in our_backends(device) + [harness.PEER_EAGER, PEER_MATMUL]:
            common = dict(
                op="scaled_matmul", backend=backend, dtype=dtype, shape=c["shape"], mode=mode, variant=EPILOGUE
            )
            recs.append(
                suite.measure(**common, make=make_matmul(backend, M, K, N, dtype, device), nbytes=nbytes, flops=flops)
            )
        return recs
    tokens, d = c["shape"]
    flops = 3 * 2 * 2 * tokens * d * 4 * d
    nbytes = 2 * tokens * d * 4 + 2 * (d * 4 * d) * 4  # x, dx (fp32); weights and their grads (fp32)
    for backend in our_backends(device):
        for scheme in ("plain-fp16", "per-resblock"):
            common = dict(
                op="resblock", backend=backend, dtype=dtype, shape=c["shape"], mode=mode, variant={"scheme": scheme}
            )
            make = make_resblock(backend, scheme, tokens, d, dtype, device)
            recs.append(suite.measure(**common, make=make, nbytes=nbytes, flops=flops))
    return recs


# ----------------------------------------------------------------------------------------------- goals


def _goal(name, values, target, better, fmt):
    from .gumbel import _goal as gumbel_goal  # one PASS/MISS rule for every family

    return gumbel_goal(name, values, target, better, fmt)


def _ratio_rows(records, backend, num_backend, epilogue_bound=False):
    """(t_other / t_ours, label) for scaled_matmul records of `backend` against the `num_backend` peer, on the
    transformer GEMMs (or, with epilogue_bound, on the short-K case alone)."""
    by = {}
    for r in records:
        if r.get("status") == "ok" and r["op"] == "scaled_matmul":
            by[(r["backend"], r["dtype"], tuple(r["shape"]))] = r
    out = []
    for (b, dt, shape), r in by.items():
        peer = by.get((num_backend, dt, shape))
        if b == backend and peer is not None and (shape[1] == EPILOGUE_K) == epilogue_bound:
            out.append((peer["median_s"] / r["median_s"], f"{dt} {'x'.join(map(str, shape))}"))
    return out


def _overhead_rows(records, backend):
    by = {}
    for r in records:
        if r.get("status") == "ok" and r["op"] == "resblock" and r["backend"] == backend:
            by[(r["dtype"], tuple(r["shape"]), r["variant"]["scheme"])] = r
    out = []
    for (dt, shape, scheme), r in by.items():
        plain = by.get((dt, shape, "plain-fp16"))
        if scheme == "per-resblock" and plain is not None:
            out.append((r["median_s"] / plain["median_s"] - 1, f"{dt} tokens x d = {'x'.join(map(str, shape))}"))
    return out


# The goals per machine kind: (what, rows function, target, better, format). "information" rows
# carry a figure the issue sets no target for.
GOALS = {
    "cpu": [
        (
            "scaled_matmul (GEMM + fused epilogue) vs the eager sequence",
            lambda r, b: _ratio_rows(r, b, harness.PEER_EAGER),
            ">= 1.3x",
            "high",
            ".2f",
        ),
        (
            f"epilogue-bound scaled_matmul (K={EPILOGUE_K}) vs the eager sequence",
            lambda r, b: _ratio_rows(r, b, harness.PEER_EAGER, True),
            ">= 1.3x",
            "high",
            ".2f",
        ),
        (
            "scaled_matmul vs plain torch.matmul (information)",
            lambda r, b: _ratio_rows(r, b, PEER_MATMUL),
            ">= 0x",
            "high",
            ".2f",
        ),
        (
            "per-resblock scheme overhead on an MLP block fwd+bwd (information)",
            _overhead_rows,
            "<= 1000%",
            "low",
            ".1%",
        ),
    ],
    "gpu": [
        (
            "scaled_matmul vs plain torch.matmul (cuBLAS)",
            lambda r, b: _ratio_rows(r, b, PEER_MATMUL),
            ">= 0.95x",
            "high",
            ".2f",
        ),
        (
            "scaled_matmul vs the eager sequence",
            lambda r, b: _ratio_rows(r, b, harness.PEER_EAGER),
            ">= 1.5x",
            "high",
            ".2f",
        ),
        (
            f"epilogue-bound scaled_matmul (K={EPILOGUE_K}) vs the eager sequence (information)",
            lambda r, b: _ratio_rows(r, b, harness.PEER_EAGER, True),
            ">= 0x",
            "high",
            ".2f",
        ),
        ("per-resblock scheme overhead on an MLP block fwd+bwd", _overhead_rows, "<= 3%", "low", ".1%"),
    ],
}


def goals(records: list[dict], kind: str) -> list[dict]:
    rows = []
    for b in CPU_BACKENDS if kind == "cpu" else GPU_BACKENDS:
        for what, pick, target, better, fmt in GOALS[kind]:
            rows.append(_goal(f"{b} {what}", pick(records, b), target, better, fmt))
    return rows


# ----------------------------------------------------------------------------------------------- runner


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    notes = []
    if s["device"].type == "cpu" and not s["smoke"]:
        notes.append(
            f"CPU run: {CPU_TOKENS} tokens instead of {TOKENS} and d_model {CPU_DMODELS} only, fp32 and bf16 (torch's "
            "fp16 GEMM on CPU is a slow reference loop), to fit a short run on 2 shared cores"
        )
    repeats, warmup = None, None
    if s["quick"]:
        notes.append("quick mode: fewer d_model values and dtypes")
        if harness.quick_gpu(s):
            repeats, warmup = s["repeats"] or harness.QUICK_GPU_REPEATS, harness.QUICK_GPU_WARMUP
    return harness.family_suite(FAMILY, s, repeats=repeats, warmup=warmup, notes=notes, peers=PEERS)


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
