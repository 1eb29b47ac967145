"""Generation family benchmarks: DALLE.generate with the mask-aware cache against a dense cache and no cache.

What is timed: model.generate(text [B, T], num_samples=1) of whole images (every one of the H*W image tokens,
each sampled with ops.sample, after the text prefix in one pass), so images/s = B / median_s: on CPU the tiny
preset (the goals) and, batch 1, the tiny widths at the paper's 256 + 32x32 positions (tiny-paper-layout, not
part of the goals); on GPU the mid preset (L = 1280). Random weights: speed does not depend on them (the sampled
codes do, the work per step does not). Whole images, not the last steps after a given image prefix: that
prefix's one pass, alike for every cache mode, would be most of a call at L = 1280 and hide the steps.

Backends: ours (the sparse cache, per kernel backend of the device: cpp on CPU; cuda and triton on GPU, where
the step runs as a CUDA graph) and the peers, measured side by side:
    dense-cache   the same cache and model, each step attending to all L - 1 cache slots with the layer's
                  mask row applied (F.scaled_dot_product_attention, boolean mask): a static dense cache (op by
                  op on GPU: no CUDA graph); on the CPU our fused step with dense attention, the strict peer
    pytorch-dense the dense cache as known implementations decode, in plain PyTorch (plain_dense_generate): the
                  same weights, F.linear / F.layer_norm / F.gelu op by op, SDPA over the whole cache under the
                  mask row, the head over the whole vocabulary (text classes then masked) and sampling in several
                  passes (softmax, torch.multinomial)
    no-cache      no cache: each step recomputes the whole prefix with the training path (model.logits);
                  skipped at L = 1280 (a thousand forward passes over up to 1280 positions: minutes a call)
    op-by-op      (CPU) the sparse cache with the step run op by op (nn.decoding.FUSE_CPU_STEP = False) instead of
                  one ops.decode_step call: what the fused step gains
On the CPU both cache modes run the fused step (ops.decode_step): dense-cache then reads every cache row up to
the position and masks per key, so ours against it measures the mask-aware key ranges alone.
Goals (issue 7): CPU tiny: >= 3x no cache and >= 1.5x dense cache; H200 mid, batch 16: >= 2x dense cache.
"""

from __future__ import annotations

import sys

import torch

from . import harness

FAMILY = "generate"
PEERS = (("dense-cache", "dense", "dense"), ("no-cache", "nocache", "none"), ("pytorch-dense", "pytorch", "pytorch"))
CPU_PEERS = PEERS + (("op-by-op", "opbyop", "op-by-op"),)
GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpp",)
GOALS = {"cpu": {"nocache": 3.0, "dense": 1.5, "pytorch": 1.5}, "cuda": {"dense": 2.0, "pytorch": 2.0}}
PEER_WORDS = {
    "nocache": "no cache",
    "dense": "a dense cache (ours, dense attention)",
    "pytorch": "a dense cache in plain PyTorch (known implementations)",
}
_models: dict[tuple, object] = {}


def _config(preset: str):
    from dalle_fast.nn import DALLEConfig

    if preset == "smoke":
        return DALLEConfig.tiny(n_layers=2, grid_h=4, grid_w=4, text_len=8)
    if preset == "tiny-paper-layout":  # the tiny widths on the paper's sequence: where the mask-aware cache pays
        return DALLEConfig.tiny(text_len=256, grid_h=32, grid_w=32, conv_kernel=11)
    return getattr(DALLEConfig, preset)()


def _model(preset: str, dtype: torch.dtype, device: torch.device):
    key = (preset, dtype, str(device))
    if key not in _models:
        from dalle_fast.nn import DALLE

        _models.clear()  # one model alive at a time (the mid preset is 1.2 GB of fp32 weights)
        torch.manual_seed(0)
        _models[key] = DALLE(_config(preset), compute_dtype=dtype, device=device).eval()
    return _models[key]


def cases(device: torch.device, *, smoke: bool = False, quick: bool = False) -> list[dict]:
    if smoke:
        return [{"preset": "smoke", "batch": 2, "dtype": torch.float32}]
    if device.type == "cuda":
        batches = (16,) if quick else (16, 1)  # the goal's batch first: a time budget skips the later cases
        return [{"preset": "mid", "batch": b, "dtype": torch.float16} for b in batches]
    tiny = [{"preset": "tiny", "batch": b, "dtype": torch.float32} for b in (1, 16)]
    if quick:
        return tiny
    # the goals are the tiny preset's; this shows the long sequence (batch 1: the dense cache's batch 16 takes
    # ~20 s a call here)
    return tiny + [{"preset": "tiny-paper-layout", "batch": 1, "dtype": torch.float32}]


def case_id(c: dict) -> str:
    return f"generate-{c['preset']}-B{c['batch']}-{harness.dtype_name(c['dtype'])}"


def our_backends(device: torch.device) -> list[str]:
    from dalle_fast import ops

    want = GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS
    return [b for b in ops.available_backends("sparse_decode_attention", device) if b in want]


def make_case(c: dict, backend: str, device: torch.device):
    def make():
        model = _model(c["preset"], c["dtype"], device)
        cfg = model.config
        gen = torch.Generator().manual_seed(1)
        text = torch.randint(0, cfg.text_vocab, (c["batch"], cfg.text_len), generator=gen).to(device)
        if backend == "pytorch-dense":
            return plain_dense_generate(model, text, seed=0)
        if backend == "op-by-op":
            from dalle_fast.nn import decoding

            def op_by_op():
                decoding.FUSE_CPU_STEP = False
                try:
                    return model.generate(text, seed=0, cache="sparse")
                finally:
                    decoding.FUSE_CPU_STEP = True

            return op_by_op
        kw = {"cache": PEER_CACHE[backend]} if backend in PEER_CACHE else {"backend": backend}
        return lambda: model.generate(text, seed=0, **kw)

    return make


PEER_CACHE = {"dense-cache": "dense", "no-cache": "none"}


def plain_dense_generate(model, text: torch.Tensor, *, seed: int):
    """A callable that decodes whole images for text [B, T] the way known implementations do, in plain PyTorch:
    the text in one pass, then per image token every resblock op by op (F.layer_norm, F.linear, F.gelu; weights
    cast once to the model's compute dtype) with a static K/V cache of every position, attention over the whole
    cache under the layer's mask row (F.scaled_dot_product_attention), the head over the whole vocabulary with
    the text classes set to -inf, and sampling in several passes (softmax, torch.multinomial)."""
    import torch.nn.functional as F

    from dalle_fast.reference.masks import allowed

    c, dev = model.config, text.device
    b, nt, lmax = text.shape[0], c.n_text_classes, c.text_len + c.image_len - 1
    pos = torch.arange(lmax, device=dev)
    masks = {}
    blocks = []
    for blk in model.blocks:
        body, dt = blk.block, blk.compute_dtype
        norm = (body.norm.normalized_shape, body.norm.weight.detach().to(dt), body.norm.bias.detach().to(dt),
                body.norm.eps)  # fmt: skip
        if hasattr(body, "qkv"):
            if body.kind not in masks:
                masks[body.kind] = allowed(body.kind, c.text_len, c.grid_h, c.grid_w, pos[:, None], pos[None, :],
                                           kernel=c.conv_kernel, conv_variant=c.conv_variant)  # fmt: skip
            inner = body.qkv
        else:
            inner = body.fc
        w = [t.detach().to(dt) for t in (inner.weight, inner.bias, body.out_proj.weight, body.out_proj.bias)]
        blocks.append((body.kind if hasattr(body, "qkv") else None, dt, norm, w))
    head = (model.norm.normalized_shape, model.norm.weight.detach(), model.norm.bias.detach(), model.norm.eps)

    def run(x, p0, k, v):  # x [B, n, d] fp32 at positions p0 .. p0 + n - 1
        n, layer = x.shape[1], 0
        for kind, dt, norm, (w1, b1, w2, b2) in blocks:
            h = F.layer_norm(x.to(dt), *norm)
            if kind is not None:
                q, kk, vv = F.linear(h, w1, b1).view(b, n, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)
                k[layer][:, :, p0 : p0 + n], v[layer][:, :, p0 : p0 + n] = kk, vv
                o = F.scaled_dot_product_attention(q, k[layer], v[layer], attn_mask=masks[kind][p0 : p0 + n])
                y = F.linear(o.transpose(1, 2).reshape(b, n, c.d_model), w2, b2)
                layer += 1
            else:
                y = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
            x = x + y.float()
        return x

    @torch.no_grad()
    def generate():
        gen = torch.Generator(device=dev).manual_seed(seed)
        n_attn = sum(kind is not None for kind, *_ in blocks)
        shape = (b, c.n_heads, lmax, c.head_dim)
        dt = model.compute_dtype
        k = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(n_attn)]
        v = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(n_attn)]
        x = run(model.embed(text, text.new_zeros(b, 0)), 0, k, v)[:, -1:]
        codes = []
        for i in range(c.image_len):
            logits = F.linear(F.layer_norm(x[:, -1], *head), model.head.weight, model.head.bias)
            logits[:, :nt] = float("-inf")
            tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0] - nt
            codes.append(tok)
            if i + 1 < c.image_len:
                row, col = divmod(i, c.grid_w)
                e = model.image_emb(tok) + model.image_row_emb.weight[row] + model.image_col_emb.weight[col]
                x = run(e[:, None], c.text_len + i, k, v)
        return torch.stack(codes, 1)

    return generate


def run_case(suite: harness.Suite, c: dict) -> list[dict]:
    device = suite.device
    cfg = _config(c["preset"])
    shape = (c["batch"], cfg.seq_len)
    variant = {"preset": c["preset"], "image_tokens": cfg.image_len}
    recs = []
    for backend in our_backends(device) + [p for p, _, _ in suite.peers]:
        if backend == "no-cache" and cfg.seq_len > 256:
            recs.append(suite.skip(op="generate", backend=backend, dtype=c["dtype"], shape=shape, mode="fwd",
                                   variant=variant, reason=f"too slow for the suite: {cfg.image_len} forward passes "
                                   f"over up to {cfg.seq_len} positions a call"))  # fmt: skip
            continue
        r = suite.measure(op="generate", backend=backend, dtype=c["dtype"], shape=shape, mode="fwd", variant=variant,
                          make=make_case(c, backend, device), nbytes=0, flops=0)  # fmt: skip
        if r["status"] == "ok":
            r["images_per_s"] = c["batch"] / r["median_s"]
        recs.append(r)
    return recs


def goals(records: list[dict], kind: str) -> list[dict]:
    want = GOALS.get(kind, GOALS["cuda"])
    ok = [r for r in records if r.get("status") == "ok" and r["op"] == "generate"]
    rows = []
    for b in CPU_BACKENDS if kind == "cpu" else GPU_BACKENDS:
        for key, target in want.items():
            mine = [r for r in ok if r["backend"] == b and (kind == "cpu" or r["shape"][0] == 16)
                    and r["variant"]["preset"] != "tiny-paper-layout"]  # fmt: skip
            sp = [r[f"speedup_vs_{key}"] for r in mine if f"speedup_vs_{key}" in r]
            peer = PEER_WORDS[key]
            rows.append({
                "goal": f"{b} sparse cache images/s vs {peer}" + ("" if kind == "cpu" else " (batch 16)"),
                "measured": f"{min(sp):.2f}x" if sp else "n/a",
                "target": f">= {target}x",
                "status": "N/A" if not sp else "PASS" if min(sp) >= target else "MISS",
                "detail": "" if sp else "no successful records in this run",
            })  # fmt: skip
    return rows


settings_from_env = harness.common_settings  # the DALLE_FAST_BENCH_* variables, for the pytest wrapper


def new_suite(s: dict) -> harness.Suite:
    gpu = s["device"].type == "cuda" and not s["smoke"]
    notes = ["one call = generate() of whole images (every image token, after the text); peers are cache modes "
             "of the same model"]  # fmt: skip
    return harness.family_suite(FAMILY, s, repeats=s["repeats"] or (3 if gpu else None),  # a call: 1000 steps
                                warmup=1 if gpu else None, notes=notes,
                                peers=CPU_PEERS if s["device"].type == "cpu" else PEERS)  # fmt: skip


def main(argv=None) -> int:
    return harness.family_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
