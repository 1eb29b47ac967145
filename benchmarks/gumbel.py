"""Gumbel-softmax family benchmarks: gumbel_softmax (fwd, bwd, fwd+bwd; soft, hard) and gumbel_argmax.

Backends: every backend dalle_fast.ops.available_backends reports for the device (the "eager" one is our
slow Philox oracle), and the peers measured side by side: "torch" = torch.nn.functional.gumbel_softmax
(argmax: torch.argmax(logits - log(-log(rand)))) and "torch.compile" of the same function. The peers draw
their noise from torch's RNG, not Philox: same work, different stream.

Minimum bytes (what any implementation must move; N elements of e bytes, R rows):
    fwd      read logits, write y                       2 N e
    bwd      read logits, read grad, write dlogits      3 N e
    fwd+bwd  the sum                                    5 N e
    argmax   read logits, write R int64                 N e + 8 R
Nominal flops per element (counted, not measured; integer Philox work is not counted; exp and log count 1):
    noise 2 (two logs); soft fwd noise + 7 (add, scale, max, sub, exp, sum, normalise) = 9;
    hard fwd noise + 2 (add, compare) = 4; bwd noise + 10 (z, max, exp, s, dy*e, t, e/s, dy - t/s, product,
    1/tau) = 12; argmax = hard fwd = 4.

Modes: "fwd" is a forward with no autograd graph (logits.requires_grad False: sampling / inference);
"bwd" times torch.autograd.grad of an existing forward (retain_graph); "fwd+bwd" one forward and its
autograd.grad together.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import harness

FAMILY = "gumbel"
SEED = 20240601
TAU = 1.0
DVAE_SHAPE = (8, 8192, 32, 32)  # dVAE codebook logits, softmax over dim 1 (stride H*W)
TOKENS_SHAPE = (8192, 8192)  # sampler logits, dim -1
SMOKE_DVAE_SHAPE = (2, 64, 4, 4)
SMOKE_TOKENS_SHAPE = (16, 256)
# B of the dVAE shape on CPU. The full B=8 suite took 6 min on 2 cores (2026-11-30, load ~1.5) and 5 min
# at B=2 under load ~2.5; DALLE_FAST_BENCH_CPU_BATCH=2 (or --cpu-batch 2) shortens a run on a busy machine,
# and the record then says so.
CPU_DVAE_BATCH = 8
# Our eager oracle runs Philox in plain torch: ~200 s per forward at 67M elements on a 2-core CPU.
EAGER_ORACLE_MAX_NUMEL_CPU = 1 << 22
GPU_BACKENDS = ("cuda", "triton")
QUICK_SKIPS_COMPILE = True  # quick mode: no inference-graph compiles (fwd, argmax) of the torch.compile peer
CPU_BACKENDS = ("cpp",)

FLOPS_PER_ELEMENT = {("soft", "fwd"): 9, ("hard", "fwd"): 4, ("soft", "bwd"): 12, ("hard", "bwd"): 12}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cost(op: str, mode: str, shape, dtype: torch.dtype, *, hard: bool = False, dim: int = -1) -> tuple[int, int]:
    """(minimum bytes, nominal flops) of one call; see the module doc."""
    n, e = _numel(shape), torch.empty((), dtype=dtype).element_size()
    if op == "gumbel_argmax":
        rows = n // shape[dim] if shape[dim] else 0
        return n * e + 8 * rows, 4 * n
    kind = "hard" if hard else "soft"
    fwd = (2 * n * e, FLOPS_PER_ELEMENT[(kind, "fwd")] * n)
    bwd = (3 * n * e, FLOPS_PER_ELEMENT[(kind, "bwd")] * n)
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


# --------------------------------------------------------------------------------------------- callables


def _torch_softmax(x, hard: bool, dim: int):
    return F.gumbel_softmax(x, tau=TAU, hard=hard, dim=dim)


def _torch_argmax(x, dim: int):
    return torch.argmax(x - torch.log(-torch.log(torch.rand_like(x))), dim)


_compiled: dict[str, object] = {}


def _compiled_fn(name: str):
    """One torch.compile wrapper per peer function: dynamo specialises on shape, dtype, hard and dim."""
    if name not in _compiled:
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit"):  # the name changed across torch versions
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        fn = {"softmax": _torch_softmax, "argmax": _torch_argmax}[name]
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def softmax_callable(backend: str, hard: bool, dim: int):
    if backend == harness.PEER_EAGER:
        return lambda x: _torch_softmax(x, hard, dim)
    if backend == harness.PEER_COMPILE:
        c = _compiled_fn("softmax")
        return lambda x: c(x, hard, dim)
    from dalle_fast import ops

    return lambda x: ops.gumbel_softmax(x, TAU, hard, dim, seed=SEED, offset=0, backend=backend)


def argmax_callable(backend: str, dim: int):
    if backend == harness.PEER_EAGER:
        return lambda x: _torch_argmax(x, dim)
    if backend == harness.PEER_COMPILE:
        c = _compiled_fn("argmax")
        return lambda x: c(x, dim)
    from dalle_fast import ops

    return lambda x: ops.gumbel_argmax(x, dim, seed=SEED, offset=0, backend=backend)


def make_softmax(backend, mode, shape, dtype, hard, dim, device):
    def make():
        f = softmax_callable(backend, hard, dim)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)
        if mode == "fwd":
            return lambda: f(x)
        x.requires_grad_(True)
        g = torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)
        if mode == "bwd":
            y = f(x)
            return lambda: torch.autograd.grad(y, x, g, retain_graph=True)
        return lambda: torch.autograd.grad(f(x), x, g)

    return make


def make_argmax(backend, shape, dtype, dim, device):
    def make():
        f = argmax_callable(backend, dim)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)
        return lambda: f(x)

    return make


# ----------------------------------------------------------------------------------------------- suite


def dtypes_for(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float32] if quick else [torch.float32, torch.float16]


def shapes_for(device: torch.device, smoke: bool, cpu_batch: int | None = None) -> list[tuple[tuple, int]]:
    if smoke:
        return [(SMOKE_DVAE_SHAPE, 1), (SMOKE_TOKENS_SHAPE, -1)]
    dvae = DVAE_SHAPE
    if device.type == "cpu" and cpu_batch:
        dvae = (cpu_batch,) + DVAE_SHAPE[1:]
    return [(dvae, 1), (TOKENS_SHAPE, -1)]


def our_backends(op: str, device: torch.device) -> list[str]:
    from dalle_fast import ops

    return list(ops.available_backends(op, device))


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False, cpu_batch: int | None = None):
    """Every case as a dict: op, shape, dim, dtype, mode, hard. Grouped so that peers sit side by side."""
    out = []
    for shape, dim in shapes_for(device, smoke, cpu_batch):
        for dtype in dtypes_for(device, quick):
            for hard in (False, True):
                for mode in harness.MODES:
                    out.append(
                        {"op": "gumbel_softmax", "shape": shape, "dim": dim, "dtype": dtype, "mode": mode, "hard": hard}
                    )
    tokens = SMOKE_TOKENS_SHAPE if smoke else TOKENS_SHAPE
    for dtype in dtypes_for(device, quick):
        out.append({"op": "gumbel_argmax", "shape": tokens, "dim": -1, "dtype": dtype, "mode": "fwd", "hard": None})
    return out


def case_id(c: dict) -> str:
    v = "" if c["hard"] is None else ("hard-" if c["hard"] else "soft-")
    return f"{c['op']}-{v}{c['mode']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}"


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    """Measure one case on every backend of the device and both peers; returns the records."""
    device = suite.device
    op, shape, dim, dtype, mode, hard = c["op"], c["shape"], c["dim"], c["dtype"], c["mode"], c["hard"]
    variant = {"dim": dim} if op == "gumbel_argmax" else {"hard": hard, "dim": dim, "tau": TAU}
    nbytes, flops = cost(op, mode, shape, dtype, hard=bool(hard), dim=dim)
    recs = []
    for backend in our_backends(op, device) + list(harness.PEERS):
        common = dict(op=op, backend=backend, dtype=dtype, shape=shape, mode=mode, variant=variant)
        if backend == "eager" and device.type == "cpu" and _numel(shape) > EAGER_ORACLE_MAX_NUMEL_CPU:
            recs.append(
                suite.skip(
                    **common,
                    reason=f"eager Philox oracle not timed on CPU above "
                    f"{EAGER_ORACLE_MAX_NUMEL_CPU} elements (~200 s a forward at 67M on 2 cores)",
                )
            )
            continue
        if backend == harness.PEER_COMPILE and suite.smoke and dtype != torch.float32:
            recs.append(suite.skip(**common, reason="smoke run: the torch.compile peer runs at float32 only"))
            continue
        if backend == harness.PEER_COMPILE and QUICK_SKIPS_COMPILE and mode == "fwd" and suite.quick:
            recs.append(
                suite.skip(
                    **common,
                    reason="quick run: torch.compile only where a goal needs it (bwd, fwd+bwd: one compiled graph)",
                )
            )
            continue
        if op == "gumbel_argmax":
            make = make_argmax(backend, shape, dtype, dim, device)
        else:
            make = make_softmax(backend, mode, shape, dtype, hard, dim, device)
        recs.append(suite.measure(**common, make=make, nbytes=nbytes, flops=flops))
    return recs


# ----------------------------------------------------------------------------------------------- goals


def _goal(name, values, target, better: str, fmt: str) -> dict:
    """values: [(value, case label)]; the worst case decides PASS/MISS."""
    if not values:
        return {
            "goal": name,
            "measured": "n/a",
            "target": target,
            "status": "N/A",
            "detail": "no successful records of this backend in this run",
        }
    pick = min if better == "high" else max
    worst, label = pick(values, key=lambda t: t[0])
    limit = float(target.strip("<>=x% "))
    limit = limit / 100 if "%" in target else limit
    ok = worst >= limit if better == "high" else worst <= limit
    span = f"worst {worst:{fmt}} ({label}); best {(max if better == 'high' else min)(v for v, _ in values):{fmt}}"
    return {
        "goal": name,
        "measured": f"{worst:{fmt}}",
        "target": target,
        "status": "PASS" if ok else "MISS",
        "detail": f"{span}; {len(values)} cases",
    }


# The goals per machine kind: (mode, record key, what, target, better, format).
GOALS = {
    "cpu": [
        ("fwd+bwd", "speedup_vs_torch", "speed-up vs torch eager", ">= 3x", "high", ".2f"),
        ("fwd+bwd", "speedup_vs_compile", "speed-up vs torch.compile", ">= 1.5x", "high", ".2f"),
        ("fwd+bwd", "memory_vs_torch", "peak extra memory / torch eager's", "<= 0.5x", "low", ".2f"),
    ],
    "gpu": [
        ("fwd", "fraction_of_copy", "fraction of copy bandwidth", ">= 85%", "high", ".1%"),
        ("fwd", "speedup_vs_torch", "speed-up vs torch eager", ">= 5x", "high", ".2f"),
        ("bwd", "fraction_of_copy", "fraction of copy bandwidth", ">= 70%", "high", ".1%"),
        ("fwd+bwd", "speedup_vs_torch", "speed-up vs torch eager", ">= 3x", "high", ".2f"),
        ("fwd+bwd", "speedup_vs_compile", "speed-up vs torch.compile", ">= 1.3x", "high", ".2f"),
    ],
}


def goals(records: list[dict], kind: str) -> list[dict]:
    def pick(backend, mode, key):
        out = []
        for r in records:
            if (
                r.get("status") == "ok"
                and r["op"] == "gumbel_softmax"
                and r["backend"] == backend
                and r["mode"] == mode
                and r.get(key) is not None
            ):
                hard = "hard" if r["variant"]["hard"] else "soft"
                out.append((r[key], f"{hard} {r['dtype']} {'x'.join(map(str, r['shape']))}"))
        return out

    rows = []
    for b in CPU_BACKENDS if kind == "cpu" else GPU_BACKENDS:
        for mode, key, what, target, better, fmt in GOALS[kind]:
            rows.append(_goal(f"{b} {mode} {what}", pick(b, mode, key), target, better, fmt))
    return rows


# ----------------------------------------------------------------------------------------------- runner


def settings_from_env() -> dict:
    """DALLE_FAST_BENCH_* variables shared by the pytest wrapper and the command line."""
    s = harness.common_settings()
    batch = os.environ.get("DALLE_FAST_BENCH_CPU_BATCH", str(CPU_DVAE_BATCH))
    s["cpu_batch"] = int(batch) if batch else None
    return s


def new_suite(s: dict) -> harness.Suite:
    notes = []
    if s["cpu_batch"] and s["cpu_batch"] != DVAE_SHAPE[0] and s["device"].type == "cpu" and not s["smoke"]:
        notes.append(f"CPU run: dVAE shape uses B={s['cpu_batch']} instead of {DVAE_SHAPE[0]} to fit the time budget")
    repeats, warmup = None, None
    if s["quick"]:
        notes.append("quick mode: fewer dtypes, fewer repeats on GPU, torch.compile only for bwd and fwd+bwd")
        if harness.quick_gpu(s):
            repeats, warmup = s["repeats"] or harness.QUICK_GPU_REPEATS, harness.QUICK_GPU_WARMUP
    return harness.family_suite(FAMILY, s, repeats=repeats, warmup=warmup, notes=notes)


def main(argv=None) -> int:
    p = harness.family_parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-batch", type=int, help=f"B of the dVAE shape on CPU (default {CPU_DVAE_BATCH})")
    a = p.parse_args(argv)
    s = harness.apply_args(settings_from_env(), a)
    s["cpu_batch"] = a.cpu_batch or s["cpu_batch"]
    todo = cases(s["device"], smoke=s["smoke"], quick=s["quick"], cpu_batch=s["cpu_batch"])
    return harness.run_family(lambda: new_suite(s), todo, run_case, case_id, goals)


if __name__ == "__main__":
    raise SystemExit(main())
