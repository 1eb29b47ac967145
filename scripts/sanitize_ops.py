"""Exercise every GPU op of the chosen families once on small, awkward shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 scripts/sanitize_ops.py

Without the caching allocator every tensor is its own cudaMalloc, so an access past a tensor's end is
outside any allocation and memcheck sees it. Shapes: ragged rows, inner sizes that are not multiples of 4,
odd offsets, K == 1, empty tensors, non-contiguous inputs and gradients, every kernel dtype; each GPU backend
the device offers ("cuda", "triton"). Exits non-zero if an op raises or returns non-finite values.
"""

import argparse
import sys

import torch


def gumbel(device: torch.device) -> list[str]:
    from dalle_fast import ops

    failures = []
    cases = [
        ((3, 7, 5), 1),
        ((4, 33), -1),
        ((2, 6, 4, 4), 1),
        ((5, 1), -1),
        ((0, 8), -1),
        ((2, 4100), -1),
        ((1, 3, 1030), 1),
    ]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for backend in [b for b in ops.available_backends("gumbel_softmax", device) if b in ("cuda", "triton")]:
        for shape, dim in cases:
            for dtype in dtypes:
                for offset in (0, 3):
                    tag = f"{backend} {dtype} {shape} dim={dim} offset={offset}"
                    try:
                        x = torch.randn(shape, device=device).to(dtype)
                        for hard in (False, True):
                            xr = x.clone().requires_grad_(True)
                            y = ops.gumbel_softmax(xr, 0.7, hard, dim, seed=1234, offset=offset, backend=backend)
                            g = (
                                torch.randn(tuple(reversed(shape)), device=device).t()
                                if len(shape) == 2
                                else torch.randn(shape, device=device)
                            )
                            y.backward(g.to(dtype))
                            ok = bool(torch.isfinite(y.float()).all() and torch.isfinite(xr.grad.float()).all())
                            if not ok:
                                failures.append(f"gumbel_softmax hard={hard} {tag}: non-finite values")
                        xt = x.transpose(0, -1) if x.dim() > 1 else x  # non-contiguous logits
                        ops.gumbel_softmax(xt, 1.0, False, 0, seed=7, offset=offset, backend=backend)
                        if x.shape[dim] > 0:
                            ops.gumbel_argmax(x, dim, seed=99, offset=offset, backend=backend)
                        n = ops.gumbel_noise(
                            list(shape), seed=5, offset=offset, device=device, dtype=dtype, backend=backend
                        )
                        if not bool(torch.isfinite(n.float()).all()):
                            failures.append(f"gumbel_noise {tag}: non-finite values")
                        torch.cuda.synchronize(device)
                    except Exception as e:
                        failures.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
    return failures


def matmul(device: torch.device) -> list[str]:
    """scaled_matmul (fwd and the three gradients) and scale_filter on ragged and awkward shapes."""
    from dalle_fast import ops
    from dalle_fast.ops.matmul import available_backends

    failures = []
    shapes = [
        ((37, 45), 29),
        ((2, 19, 33), 40),
        ((1, 1), 1),
        ((130, 257), 129),
        ((0, 8), 5),
        ((5, 0), 3),
        ((3, 200), 1),
    ]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for backend in [b for b in available_backends("scaled_matmul", device) if b in ("cuda", "triton")]:
        for a_shape, N in shapes:
            for dtype in dtypes:
                tag = f"{backend} {dtype} a{a_shape} N={N}"
                try:
                    K = a_shape[-1]
                    a = torch.randn(a_shape, device=device).to(dtype).requires_grad_(True)
                    bt = torch.randn(N, K, device=device).to(dtype)
                    b = bt.t().requires_grad_(True)  # non-contiguous b
                    bias = torch.randn(N, device=device).to(dtype).requires_grad_(True)
                    s = torch.tensor(0.5, device=device)
                    flag = torch.zeros(1, dtype=torch.int32, device=device)
                    y = ops.scaled_matmul(
                        a, b, bias, scale=s, filter_nonfinite=True, nonfinite_flag=flag, backend=backend
                    )
                    y.backward(torch.randn_like(y))
                    ok = bool(torch.isfinite(y.float()).all()) and a.grad is not None
                    if not ok:
                        failures.append(f"scaled_matmul {tag}: non-finite values")
                    if flag.item() != 0:
                        failures.append(f"scaled_matmul {tag}: flag set on clean input")
                    if dtype != torch.float32 and a.numel():  # the mixed fp32-a path
                        ops.scaled_matmul(a.detach().float(), b.detach(), scale=s, backend=backend)
                    x = torch.randn(a_shape, device=device).to(dtype)
                    ops.scale_filter(x, s, invert=True, filter_nonfinite=True, dtype=torch.float32, backend=backend)
                    ops.scale_filter(x.float(), s, dtype=dtype, backend=backend)
                    torch.cuda.synchronize(device)
                except Exception as e:
                    failures.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
    return failures


FAMILIES = {"gumbel": gumbel}
FAMILIES["matmul"] = matmul


def dvae(device: torch.device) -> list[str]:
    """gumbel_quantize (soft, hard; ragged pixel counts, K past one tile, odd offsets, channels-last logits),
    logit_laplace_nll and categorical_kl_uniform (every reduction), every kernel dtype and GPU backend."""
    from dalle_fast import ops

    failures = []
    qcases = [(2, 37, (3, 5), 11), (1, 70, (4, 4), 130), (3, 5, (1, 7), 3), (4, 33, (), 9), (1, 200, (2, 33), 64)]
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for backend in [b for b in ops.available_backends("gumbel_quantize", device) if b in ("cuda", "triton")]:
        for (B, K, sp, C), dtype, offset in [(q, d, o) for q in qcases for d in dtypes for o in (0, 3)]:
            tag = f"{backend} {dtype} B={B} K={K} spatial={sp} C={C} offset={offset}"
            try:
                x = torch.randn(B, K, *sp, device=device).to(dtype)
                if len(sp) == 2:
                    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels last
                w = torch.randn(C, K, device=device, requires_grad=True)
                b = torch.randn(C, device=device, requires_grad=True)
                for hard in (False, True):
                    xr = x.detach().clone().requires_grad_(True)
                    out = ops.gumbel_quantize(xr, w, b, tau=0.7, hard=hard, seed=99, offset=offset, backend=backend)
                    out.backward(torch.randn_like(out))
                    if not all(bool(torch.isfinite(t.float()).all()) for t in (out, xr.grad, w.grad, b.grad)):
                        failures.append(f"gumbel_quantize hard={hard} {tag}: non-finite values")
                px = (torch.rand(B, K, *sp, device=device) * 0.8 + 0.1).to(dtype)
                mu = torch.randn_like(px).requires_grad_(True)
                lb = torch.randn_like(px).requires_grad_(True)
                lg = x.detach().clone().requires_grad_(True)
                for reduction in ("mean", "sum", "none"):
                    nll = ops.logit_laplace_nll(px, mu, lb, reduction=reduction, backend=backend)
                    kl = ops.categorical_kl_uniform(lg, 1, reduction=reduction, backend=backend)
                    (nll.sum() + kl.sum()).backward()
                    if not all(bool(torch.isfinite(t.float()).all()) for t in (nll, kl, mu.grad, lb.grad, lg.grad)):
                        failures.append(f"losses reduction={reduction} {tag}: non-finite values")
                torch.cuda.synchronize(device)
            except Exception as e:
                failures.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
    return failures


FAMILIES["dvae"] = dvae


def attention(device: torch.device) -> list[str]:
    """sparse_attention forward and backward for every kind on ragged layouts (partial last tiles, column
    layers fed a prefix), head sizes 32/64/128, fp16/bf16 (and fp32 where the backend serves it), contiguous,
    [B, L, H, D]-transposed and fused-qkv-strided inputs, strided gradients, L == 1 and B * H == 0."""
    from dalle_fast import ops
    from dalle_fast.ops import attention as attn_ops

    failures = []
    # (kind, text_len, grid, L, kernel, conv_variant)
    layouts = [
        ("full", 5, (5, 7), 37, 11, "clipped"),
        ("row", 0, (9, 9), 81, 11, "clipped"),
        ("column", 16, (12, 12), 159, 11, "clipped"),
        ("column", 5, (5, 7), 33, 11, "clipped"),
        ("conv", 16, (12, 12), 150, 5, "clipped"),
        ("conv", 3, (6, 7), 45, 5, "torus"),
    ]

    def qkv(b, h, n, d, dtype, layout):
        out = []
        for _ in range(3):
            if layout == "blhd":
                x = torch.randn(b, n, h, d, device=device).transpose(1, 2)
            elif layout == "strided":
                x = torch.randn(b, n, 3, h, d, device=device)[:, :, 1].transpose(1, 2)
            else:
                x = torch.randn(b, h, n, d, device=device)
            out.append(x.to(dtype).requires_grad_(True))
        return out

    def run(backend, kind, t, grid, n, kern, variant, b, h, d, dtype, layout):
        tag = f"{backend} {kind}-{variant} T={t} grid={grid} L={n} B={b} H={h} D={d} {dtype} {layout}"
        try:
            q, k, v = qkv(b, h, n, d, dtype, layout)
            kw = dict(kind=kind, text_len=t, grid_size=grid, kernel=kern, conv_variant=variant, backend=backend)
            out = ops.sparse_attention(q, k, v, **kw)
            g = torch.randn(b, h, n, 2 * d, device=device).to(dtype)[..., ::2]  # strided grad_out
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
            torch.cuda.synchronize(device)
            for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                if not bool(torch.isfinite(x.float()).all()):
                    failures.append(f"sparse_attention {tag}: non-finite {name}")
        except Exception as e:
            failures.append(f"sparse_attention {tag}: {type(e).__name__}: {str(e)[:300]}")

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    probe = {dt: torch.empty(1, 1, 8, 32, device=device, dtype=dt) for dt in dtypes}
    for backend in ("cuda", "triton"):
        i = 0
        for dtype, like in probe.items():
            if backend not in attn_ops.available_backends(like):
                continue
            for kind, t, grid, n, kern, variant in layouts:
                for d in (32, 64, 128):
                    layout = ("contiguous", "blhd", "strided")[i % 3]
                    run(backend, kind, t, grid, n, kern, variant, 2, 3, d, dtype, layout)
                    i += 1
            run(backend, "row", 4, (2, 2), 1, 11, "clipped", 1, 2, 64, dtype, "contiguous")  # L == 1
            run(backend, "full", 4, (2, 2), 6, 11, "clipped", 0, 2, 64, dtype, "contiguous")  # B * H == 0
            run(backend, "column", 256, (32, 32), 1279, 11, "clipped", 1, 2, 64, dtype, "contiguous")  # the paper's
    return failures


FAMILIES["attention"] = attention


def decode(device: torch.device) -> list[str]:
    """sparse_decode_attention for every kind at the first, a middle and the last position of ragged grids, n = 1
    and 3, head sizes 32/64/128, fp16/bf16/fp32, contiguous and [B, Lmax, H, D]-transposed caches whose rows past
    the queries are NaN (never read), Lmax below the full layout, position as int and as a device tensor (also
    out of range: NaN output, no read outside the cache), B * H == 0."""
    from dalle_fast import ops
    from dalle_fast.ops import decode as decode_ops

    failures = []
    # (kind, text_len, grid, kernel, conv_variant)
    layouts = [
        ("full", 5, (5, 7), 11, "clipped"),
        ("row", 0, (9, 9), 11, "clipped"),
        ("column", 16, (12, 12), 11, "clipped"),
        ("conv", 16, (12, 12), 5, "clipped"),
        ("conv", 3, (6, 7), 5, "torus"),
        ("conv", 256, (32, 32), 11, "clipped"),  # the paper's
    ]

    def run(backend, kind, t, grid, kern, variant, b, h, n, d, dtype, layout, p, lmax, as_tensor):
        tag = f"{backend} {kind}-{variant} T={t} grid={grid} B={b} H={h} n={n} D={d} {dtype} {layout} p={p}"
        try:
            if layout == "blhd":
                k, v = (torch.randn(b, lmax, h, d, device=device).to(dtype).transpose(1, 2) for _ in range(2))
            else:
                k, v = (torch.randn(b, h, lmax, d, device=device).to(dtype) for _ in range(2))
            k[:, :, p + n :] = float("nan")
            v[:, :, p + n :] = float("nan")
            q = torch.randn(b, h, n, d, device=device).to(dtype)
            pos = torch.tensor(p, device=device) if as_tensor else p
            out = ops.sparse_decode_attention(q, k, v, kind=kind, position=pos, text_len=t, grid_size=grid,
                                              kernel=kern, conv_variant=variant, backend=backend)  # fmt: skip
            torch.cuda.synchronize(device)
            if not bool(torch.isfinite(out.float()).all()):
                failures.append(f"sparse_decode_attention {tag}: non-finite output")
        except Exception as e:
            failures.append(f"sparse_decode_attention {tag}: {type(e).__name__}: {str(e)[:300]}")

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for backend in ("cuda", "triton"):
        i = 0
        for dtype in dtypes:
            if backend not in decode_ops.available_backends(torch.empty(1, 1, 1, 32, device=device, dtype=dtype)):
                continue
            for kind, t, grid, kern, variant in layouts:
                full = t + grid[0] * grid[1]
                for d in (32, 64, 128):
                    n = 1 + 2 * (i % 2)
                    lmax = full - (i % 3)
                    for p in (0, (lmax - n) // 2, lmax - n):
                        run(backend, kind, t, grid, kern, variant, 2, 3, n, d, dtype, ("contiguous", "blhd")[i % 2],
                            p, lmax, i % 3 == 0)  # fmt: skip
                    i += 1
            # B * H == 0, and a device position past the end (NaN, no out-of-bounds read)
            q = torch.randn(0, 2, 1, 64, device=device).to(dtype)
            kv = torch.randn(0, 2, 20, 64, device=device).to(dtype)
            ops.sparse_decode_attention(q, kv, kv, kind="row", position=3, text_len=4, grid_size=4, backend=backend)
            q = torch.randn(1, 2, 1, 64, device=device).to(dtype)
            kv = torch.randn(1, 2, 20, 64, device=device).to(dtype)
            out = ops.sparse_decode_attention(q, kv, kv, kind="row", position=torch.tensor(25, device=device),
                                              text_len=4, grid_size=4, backend=backend)  # fmt: skip
            torch.cuda.synchronize(device)
            if not bool(torch.isnan(out.float()).all()):
                failures.append(f"sparse_decode_attention {backend} {dtype}: position out of range did not give NaN")
    return failures


FAMILIES["decode"] = decode


def sample(device: torch.device) -> list[str]:
    """ops.sample: V past one chunk, odd V and offsets, leading dims, non-contiguous rows, every kernel dtype,
    top-k / top-p on and off, an invalid row (-1), each GPU backend."""
    from dalle_fast import ops

    failures = []
    for backend in [b for b in ops.available_backends("sample", device) if b in ("cuda", "triton")]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape, offset in (((16, 8192), 0), ((3, 8191), 1), ((1, 16384), 4), ((2, 9001), 3), ((2, 3, 37), 0),
                                  ((5, 1), 2), ((0, 10), 0)):  # fmt: skip
                for k, p in ((None, None), (50, None), (None, 0.9), (7, 0.5)):
                    tag = f"{backend} {dtype} {shape} offset={offset} top_k={k} top_p={p}"
                    try:
                        x = torch.randn(shape, device=device).to(dtype)
                        out = ops.sample(x, temperature=0.8, top_k=k, top_p=p, seed=5, offset=offset, backend=backend)
                        ops.sample(x.transpose(0, -1).contiguous().transpose(0, -1), top_k=k, top_p=p, seed=5,
                                   backend=backend)  # fmt: skip
                        torch.cuda.synchronize(device)
                        if out.numel() and not bool(((out >= 0) & (out < shape[-1])).all()):
                            failures.append(f"sample {tag}: ids out of range")
                    except Exception as e:
                        failures.append(f"sample {tag}: {type(e).__name__}: {str(e)[:300]}")
            x = torch.randn(3, 100, device=device).to(dtype)
            x[1] = float("-inf")
            out = ops.sample(x, seed=1, backend=backend)
            torch.cuda.synchronize(device)
            if out.tolist()[1] != -1:
                failures.append(f"sample {backend} {dtype}: an all -inf row gave {out.tolist()[1]}, expected -1")
    return failures


FAMILIES["sample"] = sample


def dalle(device: torch.device) -> list[str]:
    """A DALL-E transformer training step (train_dalle.optimizer_step: scaler unscale, clipping, AdamW) on an odd
    layout (text 7, grid 3x5: partial tiles, every layer kind), float16 with the per-resblock scaler, bfloat16
    and float32 without, on each GPU backend."""
    from dalle_fast.nn import DALLEConfig
    from dalle_fast.ops import attention
    from dalle_fast.train_dalle import build_model, optimizer_step

    failures = []
    kinds = ("row", "column", "conv")
    c = DALLEConfig.tiny(n_layers=3, n_heads=2, head_dim=64, text_len=7, text_vocab=50, grid_h=3, grid_w=5,
                         image_vocab=13, layer_kinds=kinds, conv_kernel=3, loss_chunk=9)  # fmt: skip
    q = torch.empty(1, 1, 1, 64, device=device, dtype=torch.float16)
    for backend in [b for b in attention.available_backends(q) if b in ("cuda", "triton")]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            tag = f"dalle step {backend} {dtype}"
            try:
                torch.manual_seed(0)
                model, scaler = build_model(c, dtype, device=device, backend=backend)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.96), eps=1e-8)
                text = torch.randint(0, c.text_vocab, (3, c.text_len), device=device)
                image = torch.randint(0, c.image_vocab, (3, c.image_len), device=device)
                for _ in range(2):
                    loss = model(text, image).loss
                    loss.backward()
                    applied = optimizer_step(model, opt, scaler, 4.0, 1)
                    opt.zero_grad(set_to_none=True)
                    if not applied or not bool(torch.isfinite(loss)):
                        failures.append(f"{tag}: step skipped or loss non-finite ({float(loss)})")
                torch.cuda.synchronize(device)
            except Exception as e:
                failures.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
    return failures


FAMILIES["dalle"] = dalle


def loss(device: torch.device) -> list[str]:
    """linear_cross_entropy forward and gradients: ragged chunks, V not a multiple of the row block, d = 1,
    N = 1 and N == 0, strided x and weight, with and without bias, every kernel dtype, and an out-of-range
    target fed to the registered op directly (NaN loss, no access out of bounds)."""
    from dalle_fast import ops
    from dalle_fast.ops import loss as loss_ops

    failures = []
    cases = [(37, 24, 53, 7), (130, 64, 5000, 64), (1, 8, 3, 4), (9, 1, 2049, 4), (0, 16, 10, 8), (300, 33, 777, 1024)]
    for backend in [b for b in ops.available_backends("linear_cross_entropy", device) if b in ("cuda", "triton")]:
        for i, (n, d, v, chunk) in enumerate(cases):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                tag = f"{backend} N={n} d={d} V={v} chunk={chunk} {dtype}"
                try:
                    strided = i % 2 == 1
                    x = torch.randn(d, n, device=device).t() if strided else torch.randn(n, d, device=device)
                    w = torch.randn(v, d + 2, device=device)[:, 1 : d + 1]
                    w = w if strided else w.contiguous()
                    x, w = x.to(dtype).requires_grad_(True), (w / max(d, 1) ** 0.5).to(dtype).requires_grad_(True)
                    b = torch.randn(v, device=device).to(dtype).requires_grad_(True) if i % 3 else None
                    t = torch.randint(0, v, (n,), device=device)
                    loss_val = ops.linear_cross_entropy(x, w, b, t, chunk_size=chunk, backend=backend)
                    grads = torch.autograd.grad(loss_val, [p for p in (x, w, b) if p is not None])
                    torch.cuda.synchronize(device)
                    for name, y in [("loss", loss_val)] + [(f"grad{j}", g) for j, g in enumerate(grads)]:
                        if not bool(torch.isfinite(y.float()).all()):
                            failures.append(f"linear_cross_entropy {tag}: non-finite {name}")
                    if n:
                        bad = t.clone()
                        bad[0] = v + 5
                        op = loss_ops.registered_ops(backend)["linear_cross_entropy"]
                        out = op(x.detach(), w.detach(), None, bad, chunk, True, True, False)
                        torch.cuda.synchronize(device)
                        if not bool(torch.isnan(out[0])):
                            failures.append(f"linear_cross_entropy {tag}: out-of-range target did not give NaN")
                except Exception as e:
                    failures.append(f"linear_cross_entropy {tag}: {type(e).__name__}: {str(e)[:300]}")
    return failures


FAMILIES["loss"] = loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", help="repeatable; default: all")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device visible")
        return 2
    device = torch.device("cuda")
    bad = 0
    for name in a.family or list(FAMILIES):
        if name not in FAMILIES:
            print(f"sanitize_ops: unknown family {name!r}; known: {', '.join(FAMILIES)}")
            bad += 1
            continue
        failures = FAMILIES[name](device)
        print(f"{name}: {'ok' if not failures else f'{len(failures)} failures'}")
        for f in failures:
            print("  " + f)
        bad += len(failures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
