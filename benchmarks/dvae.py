"""dVAE family benchmarks: the fused quantizer gumbel_quantize and the two losses (logit_laplace_nll,
categorical_kl_uniform), and a whole dVAE training step.

Shapes (paper / issue 5): GPU: batch 8, 32x32 tokens, 8192 codes, 128-dim codebook (the decoder's n_init);
CPU: batch 4, 16x16 tokens, 1024 codes, 128-dim codebook. The NLL runs on the matching images (8x the token
grid, 3 channels), the KL on the quantizer's logits. fp32 throughout (DiscreteVAE keeps logits fp32).

Backends: our kernel backends for the device, and the peers measured side by side:
    torch          quantizer: F.gumbel_softmax(logits, tau, dim=1) then F.conv2d with the codebook (the
                   unfused composition eager PyTorch runs, torch's RNG instead of Philox: same work);
                   losses: the eager formulas of dalle_fast.reference (plain torch ops)
    torch.compile  torch.compile of the same functions

Modes: "fwd" (no autograd graph: inference; quantizer only) and "fwd+bwd" (one forward and autograd.grad of
logits, codebook weight and bias / of mu and ln b / of the logits).

Whole training step (op "dvae_train_step", mode fwd+bwd): DiscreteVAE.forward, backward and one AdamW step
(zero_grad, forward, backward, optimizer.step; on CUDA fp16 convolutions with torch.amp.GradScaler, as
dalle_fast.train_dvae runs) with the fused ops (our backends, and backend "eager": the same model on the
dalle_fast.reference ops) against the eager composition "torch": the same encoder and decoder with
F.gumbel_softmax + conv2d for the quantizer and the reference formulas for the losses (what the model is
without our ops). Shape (B, image side, vocab, n_hid, n_blk_per_group, n_init): GPU the paper's dVAE (batch 8,
256x256 -> 32x32 tokens, 8192 codes); CPU the widths of train_dvae's small preset (n_hid 32, one block per
group, n_init 64) with the paper's 4 groups at 128x128 (16x16 tokens), 1024 codes, batch 4. Not compiled
(torch.compile is measured on the ops). Bytes: images plus the AdamW pass over
parameters, gradients and both moments (read 4, write 3 fp32 per parameter); flops: counted by
torch.utils.flop_counter on the eager forward + backward.

Minimum bytes and nominal flops (N = B*K*S logits, P = B*S pixels, e = element size):
    quantizer fwd      read logits, write out, read W              N e + P C e + C K 4;       2 P K C + 9 N
    quantizer fwd+bwd  + read logits, grad, write dlogits, dW      3 N e + 2 P C e + 3 C K 4; 6 P K C + 21 N
    nll fwd+bwd        read x, mu, ln b, write 3 gradients         6 M e;                     ~20 M
    kl fwd+bwd         read logits twice, write dlogits            3 N e;                     ~12 N
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import harness

FAMILY = "dvae"
TAU = 1.0
SHAPES = {  # (B, K, H, W, C)
    "cuda": (8, 8192, 32, 32, 128),
    "cpu": (4, 1024, 16, 16, 128),
}
SMOKE_SHAPE = (2, 64, 4, 4, 16)
STEP_SHAPES = {  # (B, image side, vocab_size, n_hid, n_blk_per_group, n_init)
    "cuda": (8, 256, 8192, 256, 2, 128),
    "cpu": (4, 128, 1024, 32, 1, 64),
}
SMOKE_STEP_SHAPE = (2, 32, 64, 8, 1, 8)
GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)
PEERS = harness.DEFAULT_PEERS
GOALS = {"cpu": (2.0, 1.0), "cuda": (3.0, 0.25)}  # quantizer fwd+bwd: min speed-up vs eager, max memory ratio


# --------------------------------------------------------------------------------------------- callables


def _torch_quantize(x, w, b):
    return F.conv2d(F.gumbel_softmax(x, tau=TAU, dim=1), w, b)


def _torch_nll(x, mu, lb):
    from dalle_fast import reference

    return reference.logit_laplace_nll(x, mu, lb, "mean")


def _torch_kl(logits):
    from dalle_fast import reference

    return reference.categorical_kl_uniform(logits, 1, "mean")


_compiled: dict[str, object] = {}


def _compiled_fn(name: str):
    if name not in _compiled:
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        fn = {"quantize": _torch_quantize, "nll": _torch_nll, "kl": _torch_kl}[name]
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def op_callable(op: str, backend: str):
    from dalle_fast import ops

    name = {"gumbel_quantize": "quantize", "logit_laplace_nll": "nll", "categorical_kl_uniform": "kl"}[op]
    if backend == harness.PEER_EAGER:
        return {"quantize": _torch_quantize, "nll": _torch_nll, "kl": _torch_kl}[name]
    if backend == harness.PEER_COMPILE:
        return _compiled_fn(name)
    if name == "quantize":
        return lambda x, w, b: ops.gumbel_quantize(x, w, b, tau=TAU, seed=1234, backend=backend)
    if name == "nll":
        return lambda x, mu, lb: ops.logit_laplace_nll(x, mu, lb, backend=backend)
    return lambda logits: ops.categorical_kl_uniform(logits, 1, backend=backend)


def make_case(op, backend, mode, shape, dtype, device):
    B, K, H, W, C = shape

    def make():
        f = op_callable(op, backend)
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*s):
            return torch.randn(s, device=device, generator=gen, dtype=torch.float32).to(dtype)

        if op == "gumbel_quantize":
            inputs = [randn(B, K, H, W) * 2, randn(C, K, 1, 1) / K**0.5, randn(C)]
            grad_of = inputs
            g = randn(B, C, H, W)
        elif op == "logit_laplace_nll":
            px = (torch.rand(B, 3, 8 * H, 8 * W, device=device, generator=gen) * 0.8 + 0.1).to(dtype)
            inputs = [px, randn(B, 3, 8 * H, 8 * W), randn(B, 3, 8 * H, 8 * W)]
            grad_of = inputs[1:]
            g = None
        else:
            inputs = [randn(B, K, H, W) * 2]
            grad_of = inputs
            g = None
        if mode == "fwd":
            return lambda: f(*inputs)
        for t in grad_of:
            t.requires_grad_(True)
        return lambda: torch.autograd.grad(f(*inputs), grad_of, g)

    return make


def cost(op: str, mode: str, shape, dtype) -> tuple[int, int]:
    """(minimum bytes, nominal flops) of one call; see the module doc."""
    B, K, H, W, C = shape
    e = torch.empty((), dtype=dtype).element_size()
    N, P = B * K * H * W, B * H * W
    if op == "gumbel_quantize":
        if mode == "fwd":
            return N * e + P * C * e + C * K * 4, 2 * P * K * C + 9 * N
        return 3 * N * e + 2 * P * C * e + 3 * C * K * 4, 6 * P * K * C + 21 * N
    if op == "logit_laplace_nll":
        M = B * 3 * 64 * H * W
        return 6 * M * e, 20 * M
    return 3 * N * e, 12 * N


# ------------------------------------------------------------------------------------ whole training step


def _eager_dvae_forward(model, x, *, tau, beta):
    """DiscreteVAE.forward written with torch's own ops: F.gumbel_softmax + conv2d, the reference losses."""
    from dalle_fast import reference
    from dalle_fast.nn.dvae import map_pixels

    xm = map_pixels(x.float())
    logits = model.encoder(xm).float()
    cb = model.decoder.codebook
    h = F.conv2d(F.gumbel_softmax(logits, tau=tau, dim=1), cb.w, cb.b)
    stats = model.decoder.forward_embedded(h).float()
    c = model.channels
    nll = reference.logit_laplace_nll(xm, stats[:, :c], stats[:, c:], "mean")
    kl = reference.categorical_kl_uniform(logits, 1, "mean")
    return nll + beta * (logits.shape[2] * logits.shape[3]) / (x.shape[1] * x.shape[2] * x.shape[3]) * kl


def _step_model(shape, device):
    from dalle_fast.train_dvae import make_dvae

    B, S, K, n_hid, n_blk, n_init = shape
    torch.manual_seed(0)
    cfg = {"group_count": 4, "n_hid": n_hid, "n_blk_per_group": n_blk, "vocab_size": K, "n_init": n_init, "channels": 3}
    return make_dvae(cfg, device=device)


def make_step_case(backend, shape, device):
    B, S = shape[0], shape[1]

    def make():
        from dalle_fast import ops

        model = _step_model(shape, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.rand(B, 3, S, S, device=device, generator=gen)

        def loss():
            if backend == harness.PEER_EAGER:
                return _eager_dvae_forward(model, x, tau=0.5, beta=1.0)
            with ops.use_backend(backend):
                return model(x, tau=0.5, beta=1.0, seed=1234).loss

        def step():
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss()).backward()
            scaler.step(opt)
            scaler.update()

        step()  # the optimizer's moments exist before anything is timed or measured
        return step

    return make


def step_cost(shape, device) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    B, S = shape[0], shape[1]
    model = _step_model(shape, "meta")
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(B, 3, S, S, device="meta")
    with FlopCounterMode(display=False) as fc:
        _eager_dvae_forward(model, x, tau=0.5, beta=1.0).backward()
    return B * 3 * S * S * 4 + 7 * 4 * n_params, int(fc.get_total_flops())


# ----------------------------------------------------------------------------------------------- suite


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False):
    shape = SMOKE_SHAPE if smoke else SHAPES[device.type]
    out = [{"op": "gumbel_quantize", "mode": m, "shape": shape, "dtype": torch.float32} for m in ("fwd", "fwd+bwd")]
    if not quick:
        out += [{"op": op, "mode": "fwd+bwd", "shape": shape, "dtype": torch.float32}
                for op in ("logit_laplace_nll", "categorical_kl_uniform")]  # fmt: skip
        step_shape = SMOKE_STEP_SHAPE if smoke else STEP_SHAPES[device.type]
        out.append({"op": "dvae_train_step", "mode": "fwd+bwd", "shape": step_shape, "dtype": torch.float32})
    return out


def case_id(c: dict) -> str:
    return f"{c['op']}-{c['mode']}-{harness.dtype_name(c['dtype'])}-{'x'.join(map(str, c['shape']))}"


def our_backends(device: torch.device) -> list[str]:
    from dalle_fast import ops

    want = GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    return [b for b in ops.available_backends("gumbel_quantize", device) if b in want]


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    device = suite.device
    op, mode, shape, dtype = c["op"], c["mode"], c["shape"], c["dtype"]
    if op == "dvae_train_step":
        return run_step_case(suite, c)
    nbytes, flops = cost(op, mode, shape, dtype)
    recs = []
    for backend in our_backends(device) + [p for p, _, _ in suite.peers]:
        common = dict(op=op, backend=backend, dtype=dtype, shape=shape, mode=mode, variant={})
        if backend == harness.PEER_COMPILE and suite.smoke:
            recs.append(suite.skip(**common, reason="smoke run: no torch.compile"))
            continue
        recs.append(suite.measure(**common, make=make_case(op, backend, mode, shape, dtype, device),
                                  nbytes=nbytes, flops=flops))  # fmt: skip
    return recs


def run_step_case(suite: harness.Suite, c: dict) -> list[dict]:
    device, shape = suite.device, c["shape"]
    nbytes, flops = step_cost(shape, device)
    recs = []
    for backend in our_backends(device) + ["eager"] + [p for p, _, _ in suite.peers]:
        common = dict(op=c["op"], backend=backend, dtype=c["dtype"], shape=shape, mode=c["mode"], variant={})
        if backend == harness.PEER_COMPILE:
            recs.append(suite.skip(**common, reason="whole step not compiled (torch.compile is measured per op)"))
            continue
        recs.append(suite.measure(**common, make=make_step_case(backend, shape, device), nbytes=nbytes,
                                  flops=flops))  # fmt: skip
    return recs


# ----------------------------------------------------------------------------------------------- goals


def goals(records: list[dict], kind: str) -> list[dict]:
    ok = [r for r in records if r.get("status") == "ok" and r["op"] == "gumbel_quantize" and r["mode"] == "fwd+bwd"]
    speed, mem = GOALS.get(kind, GOALS["cuda"])
    rows = []
    for b in CPU_BACKENDS if kind == "cpu" else GPU_BACKENDS:
        mine = [r for r in ok if r["backend"] == b]
        sp = [r["speedup_vs_torch"] for r in mine if "speedup_vs_torch" in r]
        mr = [r["memory_vs_torch"] for r in mine if "memory_vs_torch" in r]
        rows.append({
            "goal": f"{b} gumbel_quantize fwd+bwd speed-up vs eager (gumbel_softmax + conv)",
            "measured": f"{min(sp):.2f}x" if sp else "n/a",
            "target": f">= {speed}x",
            "status": "N/A" if not sp else "PASS" if min(sp) >= speed else "MISS",
            "detail": "" if sp else "no successful records in this run",
        })  # fmt: skip
        cmp = "<" if kind == "cpu" else "<="
        rows.append({
            "goal": f"{b} gumbel_quantize fwd+bwd peak extra memory / eager's",
            "measured": f"{max(mr):.3f}" if mr else "n/a",
            "target": f"{cmp} {mem}",
            "status": "N/A" if not mr else "PASS" if (max(mr) < mem if kind == "cpu" else max(mr) <= mem) else "MISS",
            "detail": "" if mr else "no successful records in this run",
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- runner


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    repeats, warmup, notes = None, None, []
    if harness.quick_gpu(s):
        repeats, warmup = s["repeats"] or harness.QUICK_GPU_REPEATS, harness.QUICK_GPU_WARMUP
        notes.append(f"quick mode: quantizer only, {repeats} repeats after {warmup} warm-up calls")
    return harness.family_suite(FAMILY, s, repeats=repeats, warmup=warmup, notes=notes, peers=PEERS)


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
