"""Loss head family benchmarks: ops.linear_cross_entropy (chunked linear + cross-entropy) fwd+bwd.

Cases: the loss head of the DALL-E transformer, N rows of hidden states [N, d] against the image vocabulary
(8192) and the text vocabulary (16384), summed cross-entropy, forward and the gradients of x, weight and bias.
    GPU: N = 2048, d = 1024, fp32 (what the model passes: its residual stream is fp32) and fp16; chunk 1024 (the
         model's default loss_chunk: 2 chunks).
    CPU: d = 512, fp32 (the full GPU size is seconds per call on 2 cores): N = 1024 in chunks of 256 (4 chunks,
         where the chunking costs: smaller GEMMs and a read-modify-write of dW per chunk), and N = 2048 in chunks
         of 1024 (the model's default).
Peers measured side by side:
    "torch"          the dense eager composition F.cross_entropy(F.linear(x, W, b), t, reduction="sum"),
                     which holds the [N, V] logits and their log-softmax for backward
    "chunked-eager"  ops.linear_cross_entropy(backend="eager"): the same chunked algorithm in torch ops
                     (logsumexp, gather, sub_, exp_, index update: several passes over each chunk)
Ours: cpp (CPU), cuda and triton (GPU). Peak memory is the extra memory of one fwd+bwd call (the harness).

Minimum bytes: read x, W, b, write dx, dW, db (the gradients have the inputs' sizes); flops: three GEMMs,
2 N V d each.
"""

from __future__ import annotations

import sys

import torch

from . import harness

FAMILY = "loss"
# ((N, d, V), chunk_size)
GPU_CASES = [((2048, 1024, 8192), 1024), ((2048, 1024, 16384), 1024)]
CPU_CASES = [((1024, 512, 8192), 256), ((1024, 512, 16384), 256), ((2048, 512, 16384), 1024)]
SMOKE_CASES = [((64, 32, 100), 16)]
GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)
PEER_CHUNKED = "chunked-eager"
PEERS = ((harness.PEER_EAGER, "torch", "vs dense"), (PEER_CHUNKED, "chunked", "vs chunked"))


def cost(N: int, d: int, V: int, dtype: torch.dtype) -> tuple[int, int]:
    e = torch.empty((), dtype=dtype).element_size()
    return 2 * (N * d + V * d + V) * e + N * 8, 3 * 2 * N * V * d


def make_loss(backend: str, N: int, d: int, V: int, chunk: int, dtype: torch.dtype, device: torch.device):
    def make():
        import torch.nn.functional as F

        from dalle_fast import ops

        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, d, device=device, generator=gen).to(dtype).requires_grad_(True)
        w = (torch.randn(V, d, device=device, generator=gen) / d**0.5).to(dtype).requires_grad_(True)
        b = torch.randn(V, device=device, generator=gen).to(dtype).requires_grad_(True)
        t = torch.randint(0, V, (N,), device=device, generator=gen)
        params = [x, w, b]
        if backend == harness.PEER_EAGER:
            return lambda: torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t, reduction="sum"), params)
        name = "eager" if backend == PEER_CHUNKED else backend
        return lambda: torch.autograd.grad(ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk, backend=name), params)

    return make


# ----------------------------------------------------------------------------------------------- suite


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False) -> list[dict]:
    if smoke:
        todo, dtypes = SMOKE_CASES, [torch.float32]
    elif device.type == "cpu":
        todo, dtypes = CPU_CASES, [torch.float32]
    else:
        todo = GPU_CASES
        dtypes = [torch.float32] if quick else [torch.float32, torch.float16]
    return [
        {"op": "linear_cross_entropy", "shape": s, "dtype": dt, "mode": "fwd+bwd", "chunk": chunk}
        for dt in dtypes
        for s, chunk in todo
    ]


def case_id(c: dict) -> str:
    return f"{c['op']}-{c['mode']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}-chunk{c['chunk']}"


def our_backends(device: torch.device) -> list[str]:
    from dalle_fast.ops.loss import available_backends

    want = GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    return [b for b in available_backends("linear_cross_entropy", device) if b in want]


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    device = suite.device
    N, d, V = c["shape"]
    nbytes, flops = cost(N, d, V, c["dtype"])
    recs = []
    for backend in our_backends(device) + [harness.PEER_EAGER, PEER_CHUNKED]:
        make = make_loss(backend, N, d, V, c["chunk"], c["dtype"], device)
        recs.append(
            suite.measure(
                op=c["op"],
                backend=backend,
                dtype=c["dtype"],
                shape=c["shape"],
                mode=c["mode"],
                variant={"chunk": c["chunk"]},
                make=make,
                nbytes=nbytes,
                flops=flops,
            )  # fmt: skip
        )
    return recs


# ----------------------------------------------------------------------------------------------- goals


def _rows(records, backend, key):
    out = []
    for r in records:
        if r.get("status") == "ok" and r["backend"] == backend and key in r:
            out.append((r[key], f"{r['dtype']} {'x'.join(map(str, r['shape']))} chunk {r['variant']['chunk']}"))
    return out


def goals(records: list[dict], kind: str) -> list[dict]:
    """The issue sets no number for the loss head: information rows (time and memory against both peers)."""
    from .gumbel import _goal  # one PASS/MISS rule for every family

    rows = []
    for b in CPU_BACKENDS if kind == "cpu" else GPU_BACKENDS:
        for key, what, better, target in (
            ("speedup_vs_torch", "fwd+bwd speed-up vs the dense eager composition", "high", ">= 0x"),
            ("speedup_vs_chunked", "fwd+bwd speed-up vs the chunked eager composition", "high", ">= 0x"),
            ("memory_vs_torch", "peak extra memory / the dense composition's", "low", "<= 1000x"),
            ("memory_vs_chunked", "peak extra memory / the chunked eager composition's", "low", "<= 1000x"),
        ):
            rows.append(_goal(f"{b} {what} (information)", _rows(records, b, key), target, better, ".2f"))
    return rows


# ----------------------------------------------------------------------------------------------- runner


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    notes = []
    if s["device"].type == "cpu" and not s["smoke"]:
        notes.append(f"CPU run: ((N, d, V), chunk) {CPU_CASES}, fp32, d = 512 to fit 2 shared cores")
    return harness.family_suite(FAMILY, s, notes=notes, peers=PEERS)


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
