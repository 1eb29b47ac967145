"""DALL-E transformer family benchmarks: one training step (fwd + bwd + AdamW) and the loss forward.

Model: dalle_fast.nn.DALLE at L = T + H*W. GPU: the mid preset (24 layers, 16 heads of 64, d_model 1024, L = 256 +
32x32 = 1280), batch 8, float16 resblocks with the per-resblock gradient scaler (the training configuration).
CPU: the tiny preset (4 layers, 4 heads of 32, L = 16 + 8x8 = 80), batch 32, float32; and the tiny widths on the
paper's sequence layout (L = 256 + 32x32 = 1280, 11x11 conv), batch 2, where attention is most of the work.

Modes:
    fwd+bwd  one training step: the loss forward, backward, (scaler unscale,) gradient clipping at 4, AdamW step
    fwd      the loss forward alone, no autograd graph

Backends: the model with our kernels (backend = each kernel backend of the device), and peers measured side by side,
the very same model (same weights, inputs and optimizer) with
    eager        backend="eager": every op its eager reference — attention dense-masked (q k^T over all pairs, masked,
                 softmax, @ v, in fp32 math), matmuls torch.matmul
    sdpa_masked  eager matmuls, attention by F.scaled_dot_product_attention with the dense bool mask in the compute
                 dtype (what a dense implementation would do)
    flex         eager matmuls, attention by torch.compile(flex_attention) with a block mask from
                 dalle_fast.masks.mask_mod (on CPU FlexAttention has no backward: the training step is skipped there
                 and the forward measured)
Figures: median seconds per call, tokens/s (batch x (L - 1) positions read per step), peak extra memory of a call
(the optimizer's state exists before it: every backend makes one untimed step first).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from . import harness

FAMILY = "dalle"
SETTINGS_BY_DEVICE = {
    "cuda": [{"preset": "mid", "batch": 8, "dtype": torch.float16}],
    "cpu": [
        {"preset": "tiny", "batch": 32, "dtype": torch.float32},
        # the tiny widths on the paper's sequence layout: where attention, not the matmuls, is the work
        {
            "preset": "tiny",
            "batch": 2,
            "dtype": torch.float32,
            "overrides": {"text_len": 256, "grid_h": 32, "grid_w": 32, "conv_kernel": 11},
        },
    ],
}
SMOKE = [{"preset": "tiny", "batch": 1, "dtype": torch.float32, "overrides": {"n_layers": 2}}]
MODES = ("fwd+bwd", "fwd")
PEERS = (("eager", "eager", "eager"), ("sdpa_masked", "masked", "mask"), ("flex", "flex", "flex"))
GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)


# --------------------------------------------------------------------------------------------- the model


def make_config(preset: str, overrides=None):
    from dalle_fast.nn import DALLEConfig

    return getattr(DALLEConfig, preset)(**(overrides or {}))


def _flex_fn():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    return torch.compile(flex_attention, dynamic=False)


def replace_attention(model, peer: str) -> None:
    """Route every attention resblock of `model` through `peer` ("sdpa_masked" or "flex") instead of
    dalle_fast.ops.sparse_attention; everything else of the model is untouched."""
    from dalle_fast import masks
    from dalle_fast.nn.dalle import Attention

    c = model.config
    n = c.seq_len - 1  # the model reads the first L - 1 tokens
    device = next(model.parameters()).device
    flex = _flex_fn() if peer == "flex" else None
    per_kind = {}
    for kind in set(c.kinds):
        args = (kind, c.text_len, c.grid_h, c.grid_w)
        kw = dict(kernel=c.conv_kernel, conv_variant=c.conv_variant)
        if peer == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            per_kind[kind] = create_block_mask(masks.mask_mod(*args, **kw), None, None, n, n, device=str(device))
        else:
            per_kind[kind] = masks.dense_mask(*args, **kw, device=device)[:n, :n]

    def forward(self, x):
        b, L, d = x.shape
        qkv = self.qkv(self.norm(x)).view(b, L, 3, c.n_heads, c.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if L != n:
            raise ValueError(f"{peer} peer: built for {n} positions, got {L}")
        if flex is not None:
            o = flex(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=per_kind[self.kind])
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=per_kind[self.kind])
        return self.out_proj(o.transpose(1, 2).reshape(b, L, d))

    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(forward, m)


def build(c, backend: str, device, dtype):
    """(model, optimizer, scaler) for one backend or peer, the same weights for all (seeded)."""
    from dalle_fast.amp import PerResblockGradScaler
    from dalle_fast.nn import DALLE
    from dalle_fast.train_dalle import param_groups

    torch.manual_seed(0)
    scaler = PerResblockGradScaler(2 * c.n_layers, device=device) if dtype == torch.float16 else None
    peer = backend in {p for p, _, _ in PEERS}
    model = DALLE(c, compute_dtype=dtype, scaler=scaler, backend="eager" if peer else backend, device=device)
    if backend in ("sdpa_masked", "flex"):
        replace_attention(model, backend)
    opt = torch.optim.AdamW(param_groups(model, 4.5e-2), lr=1e-4, betas=(0.9, 0.96), eps=1e-8)
    return model, opt, scaler


def make_case(c, backend, mode, batch, dtype, device):
    def make():
        from dalle_fast.train_dalle import optimizer_step

        model, opt, scaler = build(c, backend, device, dtype)
        gen = torch.Generator(device="cpu").manual_seed(1)
        text = torch.randint(0, c.text_vocab, (batch, c.text_len), generator=gen).to(device)
        image = torch.randint(0, c.image_vocab, (batch, c.image_len), generator=gen).to(device)

        if mode == "fwd":

            def step():
                with torch.no_grad():
                    return model(text, image).loss

        else:

            def step():
                loss = model(text, image).loss
                loss.backward()
                optimizer_step(model, opt, scaler, 4.0, 1)
                opt.zero_grad(set_to_none=True)
                return loss.detach()

        step()  # untimed: optimizer state, torch.compile of the flex peer, first-call allocations
        return step

    return make


# ----------------------------------------------------------------------------------------------- suite


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False):
    out = []
    for s in SMOKE if smoke else SETTINGS_BY_DEVICE[device.type]:
        c = make_config(s["preset"], s.get("overrides"))
        for mode in MODES:
            out.append(dict(s, overrides=s.get("overrides"), mode=mode, seq_len=c.seq_len))
    return out


def case_id(c: dict) -> str:
    return f"{c['preset']}-{c['mode']}-{harness.dtype_name(c['dtype'])}-B{c['batch']}xL{c['seq_len']}"


def our_backends(device: torch.device) -> list[str]:
    return list(GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS)


def step_flops(c, batch: int, mode: str) -> float:
    """Dense-equivalent model flops: 2 x parameters in the matmuls x tokens (forward), x3 with backward; attention
    counted on the pairs the masks allow is left out (small next to the matmuls at these sizes)."""
    d, n = c.d_model, c.seq_len - 1
    matmul_params = c.n_layers * 12 * d * d + d * (c.n_text_classes + c.image_vocab)
    fwd = 2 * matmul_params * batch * n
    return fwd * (3 if mode == "fwd+bwd" else 1)


def run_case(suite: harness.Suite, case: dict) -> list[dict]:
    device = suite.device
    c = make_config(case["preset"], case["overrides"])
    batch, dtype, mode = case["batch"], case["dtype"], case["mode"]
    shape = (batch, c.seq_len)
    variant = {"preset": case["preset"], "layers": c.n_layers, "d_model": c.d_model, "T": c.text_len,
               "grid": f"{c.grid_h}x{c.grid_w}"}  # fmt: skip
    if dtype == torch.float16:
        variant["scaler"] = "per-resblock"
    recs = []
    n_params = c.n_layers * 12 * c.d_model**2
    for backend in our_backends(device) + [p for p, _, _ in PEERS]:
        common = dict(op="dalle_train_step" if mode == "fwd+bwd" else "dalle_loss", backend=backend, dtype=dtype,
                      shape=shape, mode=mode, variant=variant)  # fmt: skip
        if backend == "flex" and mode != "fwd" and device.type == "cpu":
            recs.append(suite.skip(**common, reason="FlexAttention has no backward on CPU"))
            continue
        if backend == "flex" and suite.smoke:
            recs.append(suite.skip(**common, reason="smoke run: no FlexAttention compile"))
            continue
        rec = suite.measure(
            **common,
            make=make_case(c, backend, mode, batch, dtype, device),
            nbytes=16 * (n_params + c.d_model * (c.n_text_classes + c.image_vocab)),  # fp32 weights, grads, 2 moments
            flops=int(step_flops(c, batch, mode)),
        )
        if rec["status"] == "ok":
            rec["tokens_per_s"] = batch * (c.seq_len - 1) / rec["median_s"]
        recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------- goals


def _goal(name, values, limit):
    if not values:
        return {"goal": name, "measured": "n/a", "target": f">= {limit}x", "status": "N/A",
                "detail": "no successful records in this run"}  # fmt: skip
    worst, label = min(values)
    return {"goal": name, "measured": f"{worst:.2f}x", "target": f">= {limit}x",
            "status": "PASS" if worst >= limit else "MISS",
            "detail": "; ".join(f"{lab} {v:.2f}" for v, lab in sorted(values, key=lambda t: t[1]))}  # fmt: skip


def goals(records: list[dict], kind: str) -> list[dict]:
    ok = [r for r in records if r.get("status") == "ok"]

    def ratios(backend, key, mode="fwd+bwd", seq_len=None):
        return [(r[key], f"{r['backend']} L={r['shape'][1]}") for r in ok
                if r["backend"] == backend and r["mode"] == mode and key in r
                and (seq_len is None or r["shape"][1] == seq_len)]  # fmt: skip

    rows = []
    if kind == "cpu":
        tiny = make_config("tiny").seq_len
        for b in CPU_BACKENDS:
            rows.append(_goal(f"{b} tiny preset training step tokens/s vs the eager-masked model",
                              ratios(b, "speedup_vs_eager", seq_len=tiny), 1.5))  # fmt: skip
        return rows
    for b in GPU_BACKENDS:
        rows.append(_goal(f"{b} training step tokens/s vs the eager-masked model", ratios(b, "speedup_vs_eager"), 1.5))
        rows.append(_goal(f"{b} training step tokens/s vs the FlexAttention model", ratios(b, "speedup_vs_flex"), 1.0))
        mem = [(1 / r["memory_vs_flex"], r["backend"]) for r in ok
               if r["backend"] == b and r["mode"] == "fwd+bwd" and r.get("memory_vs_flex")]  # fmt: skip
        rows.append(_goal(f"{b} training step peak memory: FlexAttention model's / ours", mem, 1.0))
    return rows


# ----------------------------------------------------------------------------------------------- runner


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    repeats, warmup = None, None
    notes = [
        "tokens_per_s = batch x (L - 1) / median; the eager peer's attention is the dense-masked reference "
        "(fp32 math); sdpa_masked and flex use eager matmuls with that attention only replaced",
    ]
    if s["device"].type == "cuda" and not s["smoke"]:
        repeats, warmup = s["repeats"] or (5 if s["quick"] else 10), 2
        notes.append(f"GPU: {repeats} timed steps after {warmup} warm-up steps per backend")
    return harness.family_suite(FAMILY, s, repeats=repeats, warmup=warmup, notes=notes, peers=PEERS)


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
