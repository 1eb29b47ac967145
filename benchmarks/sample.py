"""Sampling family benchmarks: ops.sample (temperature, top-k / top-p filtering and Gumbel-max in one kernel).

Shape: the decoder's sampling step, B = 16 rows of the image vocabulary V = 8192 (smoke: 4 x 256).
Variants: top_k = 64; top_p = 0.9; both. Backends: every backend ops.available_backends("sample") reports for
the device (on CPU "eager" is our slow Philox oracle) and the peers measured side by side:
    "torch"          the eager multi-pass sampler of the usual generation loops: torch.topk and a mask,
                     torch.sort + softmax + cumsum + scatter for top-p, softmax + torch.multinomial
    "torch.compile"  torch.compile of that same function (GPU only: on CPU its compile costs more than the
                     whole family and multinomial breaks the graph anyway)
The peer draws from torch's RNG, not Philox: same work, different stream.
Minimum bytes: read the logits once, write B int64 (N e + 8 B). Nominal flops: 0 (a selection, not
arithmetic): the records carry time and GB/s only.
"""

from __future__ import annotations

import sys

import torch

from . import harness

FAMILY = "sample"
SEED = 20240601
TEMPERATURE = 0.9
SHAPE = (16, 8192)
SMOKE_SHAPE = (4, 256)
VARIANTS = ({"top_k": 64, "top_p": None}, {"top_k": None, "top_p": 0.9}, {"top_k": 64, "top_p": 0.9})


def torch_sample(x, temperature: float, top_k, top_p):
    """The eager multi-pass sampler (the peer)."""
    z = x.float() / temperature
    if top_k is not None:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        remove = probs.cumsum(-1) - probs >= top_p  # the mass before an entry already reaches top_p
        sorted_z = sorted_z.masked_fill(remove, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, idx, sorted_z)
    return torch.multinomial(torch.softmax(z, dim=-1), 1).squeeze(-1)


_compiled = None


def _callable(backend: str, top_k, top_p):
    global _compiled
    if backend == harness.PEER_EAGER:
        return lambda x: torch_sample(x, TEMPERATURE, top_k, top_p)
    if backend == harness.PEER_COMPILE:
        if _compiled is None:
            _compiled = torch.compile(torch_sample, dynamic=False)
        return lambda x: _compiled(x, TEMPERATURE, top_k, top_p)
    from dalle_fast import ops

    return lambda x: ops.sample(x, temperature=TEMPERATURE, top_k=top_k, top_p=top_p, seed=SEED, backend=backend)


def make(backend, shape, dtype, top_k, top_p, device):
    def build():
        f = _callable(backend, top_k, top_p)
        gen = torch.Generator(device=device).manual_seed(0)
        x = (3 * torch.randn(shape, dtype=torch.float32, device=device, generator=gen)).to(dtype)
        return lambda: f(x)

    return build


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False) -> list[dict]:
    dtypes = [torch.float32] if (quick or smoke or device.type == "cpu") else [torch.float32, torch.bfloat16]
    shape = SMOKE_SHAPE if smoke else SHAPE
    return [{"shape": shape, "dtype": dt, **v} for dt in dtypes for v in VARIANTS]


def case_id(c: dict) -> str:
    return f"sample-k{c['top_k']}-p{c['top_p']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}"


def peers_for(device: torch.device):
    if device.type == "cuda":
        return harness.DEFAULT_PEERS
    return ((harness.PEER_EAGER, "torch", "torch"),)


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    from dalle_fast import ops

    device = suite.device
    shape, dtype = c["shape"], c["dtype"]
    B = 1
    for s in shape[:-1]:
        B *= s
    nbytes = B * shape[-1] * torch.empty((), dtype=dtype).element_size() + 8 * B
    variant = {"top_k": c["top_k"], "top_p": c["top_p"]}  # temperature: TEMPERATURE in every case
    recs = []
    for backend in list(ops.available_backends("sample", device)) + [p for p, _, _ in suite.peers]:
        if backend == "eager" and device.type == "cpu" and not suite.smoke:
            reason = "eager Philox oracle not timed on CPU outside smoke runs (0.2-0.9 s a call on 2 cores)"
            recs.append(suite.skip(op="sample", backend=backend, dtype=dtype, shape=shape, mode="fwd", variant=variant,
                                   reason=reason))  # fmt: skip
            continue
        recs.append(
            suite.measure(
                op="sample", backend=backend, dtype=dtype, shape=shape, mode="fwd", variant=variant,
                make=make(backend, shape, dtype, c["top_k"], c["top_p"], device), nbytes=nbytes, flops=0,
            )
        )  # fmt: skip
    return recs


# The issue sets no number for the sampler alone; the family reports the ratio to the eager sampler.
GOALS = {"cpu": ("cpp", ">= 1x"), "gpu": ("cuda", ">= 1x")}


def goals(records: list[dict], kind: str) -> list[dict]:
    backend, target = GOALS[kind]
    vals = [
        (r["speedup_vs_torch"], f"k={r['variant']['top_k']} p={r['variant']['top_p']} {r['dtype']}")
        for r in records
        if r.get("status") == "ok" and r["backend"] == backend and r.get("speedup_vs_torch") is not None
    ]
    if not vals:
        return [{"goal": f"{backend} speed-up vs the eager sampler", "measured": "n/a", "target": target,
                 "status": "N/A", "detail": "no successful records of this backend in this run"}]  # fmt: skip
    worst, label = min(vals)
    return [
        {
            "goal": f"{backend} speed-up vs the eager sampler",
            "measured": f"{worst:.2f}",
            "target": target,
            "status": "PASS" if worst >= 1 else "MISS",
            "detail": f"worst {worst:.2f} ({label}); best {max(v for v, _ in vals):.2f}; {len(vals)} cases",
        }
    ]


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    cpu = s["device"].type == "cpu" and not s["smoke"]
    # calls take milliseconds on CPU: 20 repeats cost under a second per backend
    return harness.family_suite(FAMILY, s, repeats=s["repeats"] or (20 if cpu else None), peers=peers_for(s["device"]))


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
