"""Text-to-image decoding for DALLE: a mask-aware KV cache, one-kernel sampling, reranking (issue 7).

Generating an image is grid_h * grid_w sequential steps. The cache holds, per attention layer, the keys and
values of every position decoded so far ([B, L - 1, H, D] in the model's compute dtype, preallocated once;
the last image token is never fed back). A step embeds one image token, runs every resblock on that single
position and computes the LM head only for the image vocabulary at that position:

    prefill   text [B, T] (+ an optional image prefix of m codes): one pass of the training attention op
              (dalle_fast.ops.sparse_attention) over the T + m positions, writing their keys and values
    step i    token i -> embedding (code + row + column) -> per layer: q, k, v of the one position, k and v
              written to the cache, dalle_fast.ops.sparse_decode_attention reads only the keys the layer's
              mask allows at that position (text + W + 1 keys for a row layer, text + <= grid_h for a column
              layer, text + the window for conv) -> MLP -> final norm -> image logits -> ops.sample

`cache` selects the attention of a step (for tests and benchmarks): "sparse" (the above), "dense" (the same
cache, all L - 1 slots read with the layer's mask row applied, F.scaled_dot_product_attention: what a static
dense cache does, the kind a CUDA graph needs) or "none" (no cache: the whole prefix recomputed by the training
path every step). On CUDA the sparse step is captured once in a CUDA graph
(its token and position live in device tensors that each replay updates), so a step costs one graph launch
plus the sampling kernel. On the CPU in float32 (when the cpp backend serves every block) a step after the
embedding is one call of dalle_fast.ops.decode_step, the whole stack in C++ (both cache modes; "dense" then
reads every row up to the position with the mask applied per key): at the sizes a CPU decodes, the per-op
costs of the op-by-op step were most of it. FUSE_CPU_STEP = False keeps the op-by-op step (benchmarks).

Classifier-free guidance (guidance_scale s != 1; not in the paper): the batch is doubled with the empty caption
(null_text: every text position its pad) and each step samples from u + s * (c - u), c and u the two halves'
logits, the chosen token fed to both halves. Reranking: rerank orders one caption's samples by a scorer, by
default the model's log-likelihood; contrastive_scorer compares it with that under other captions.

Sampling noise: step i draws its Gumbel noise at element numbers offset_i + b * V + v with offset_i = i * B * V
(B the number of sequences, V the image vocabulary): every step and sequence has its own slice of the one
stream of seed `seed`, so the images are a pure function of (model, text, seed) on a given backend.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..reference.masks import allowed

CACHE_MODES = ("sparse", "dense", "none")
FUSE_CPU_STEP = True  # the CPU float32 step as one ops.decode_step call (False: op by op, for comparisons)


def _attention_bodies(model):
    """(attention resblock, its body) for each layer, in order."""
    from .dalle import Attention

    return [(blk, blk.block) for blk in model.blocks if isinstance(blk.block, Attention)]


class _Decoder:
    """The decoding state of one generate call: the cache and the prefill / step functions."""

    def __init__(self, model, batch: int, cache: str, device):
        c = model.config
        self.model, self.c, self.mode = model, c, cache
        self.lmax = c.text_len + c.image_len - 1
        self.n_attn = len(_attention_bodies(model))
        shape = (batch, self.lmax, c.n_heads, c.head_dim)
        dt = model.compute_dtype
        # the dense mode reads unwritten slots (masked, weight 0): they must hold finite values, not garbage
        alloc = torch.zeros if cache == "dense" else torch.empty
        self.k = [alloc(shape, dtype=dt, device=device) for _ in range(self.n_attn)]
        self.v = [alloc(shape, dtype=dt, device=device) for _ in range(self.n_attn)]
        self.nt = c.n_text_classes
        self._masks: dict[str, torch.Tensor] = {}
        self._plan = None  # bound on the first step (_bind)
        self.fused = None  # ops.bind_decode_step's callable when the step runs as one C++ call (_bind)

    # -- pieces
    def _image_logits(self, h_last):
        m = self.model
        return F.linear(m.norm(h_last), m.head.weight[self.nt :], m.head.bias[self.nt :])

    def _dense_mask(self, kind) -> torch.Tensor:
        if kind not in self._masks:
            c = self.c
            pos = torch.arange(self.lmax, device=self.k[0].device)
            self._masks[kind] = allowed(kind, c.text_len, c.grid_h, c.grid_w, pos[:, None], pos[None, :],
                                        kernel=c.conv_kernel, conv_variant=c.conv_variant)  # fmt: skip
        return self._masks[kind]

    def _bind(self, batch: int, device) -> None:
        """The step's plan, resolved once per generate call: every resblock's norm parameters in its compute
        dtype, its projections bound with ops.bind_linear and, for attention, ops.bind_decode_attention, so that
        a step calls the kernels without the per-call checks and backend choice (at batch 1 on the CPU those
        cost more than the step's small products; the prefill has already run every layer through the checked
        ops). Both cache modes share it: they differ only in the attention call."""
        if self._bind_fused(device):
            return
        c, plan, layer = self.c, [], 0
        for blk in self.model.blocks:
            body, dt = blk.block, blk.compute_dtype
            h = torch.empty(batch, 1, c.d_model, dtype=dt, device=device)
            norm = (body.norm.normalized_shape, body.norm.weight.detach().to(dt), body.norm.bias.detach().to(dt),
                    body.norm.eps)  # fmt: skip
            if hasattr(body, "qkv"):
                q = torch.empty(batch, 1, c.n_heads, c.head_dim, dtype=dt, device=device).transpose(1, 2)
                kc, vc = self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2)
                attend = None
                if self.mode == "sparse":
                    attend = ops.bind_decode_attention(
                        q, kc, vc, kind=body.kind, text_len=c.text_len, grid_size=(c.grid_h, c.grid_w),
                        kernel=c.conv_kernel, conv_variant=c.conv_variant, backend=body.backend,
                    )  # fmt: skip
                qkv = ops.bind_linear(h, body.qkv.weight, body.qkv.bias, backend=body.qkv.backend)
                out = ops.bind_linear(h, body.out_proj.weight, body.out_proj.bias, backend=body.out_proj.backend)
                plan.append(("attn", dt, norm, (qkv, out, attend, layer, body.kind)))
                layer += 1
            else:
                hid = torch.empty(batch, 1, body.fc.out_features, dtype=dt, device=device)
                fc = ops.bind_linear(h, body.fc.weight, body.fc.bias, backend=body.fc.backend)
                out = ops.bind_linear(hid, body.out_proj.weight, body.out_proj.bias, backend=body.out_proj.backend)
                plan.append(("mlp", dt, norm, (fc, out)))
        self._plan = plan
        m = self.model
        self._head = (m.norm.normalized_shape, m.norm.weight.detach(), m.norm.bias.detach(), m.norm.eps,
                      m.head.weight.detach()[self.nt :], m.head.bias.detach()[self.nt :])  # fmt: skip

    def _bind_fused(self, device) -> bool:
        """Bind the step as one ops.decode_step call when the cpp backend would serve every op of the step
        (CPU, float32 everywhere, no other backend asked for by a block, the context or the environment)."""
        m = self.model
        if not (FUSE_CPU_STEP and device.type == "cpu" and self.mode in ("sparse", "dense")):
            return False
        if ops.requested_backend() not in (None, "cpp"):
            return False
        blocks = []
        for blk in m.blocks:
            b = blk.block
            attn = hasattr(b, "qkv")
            inner = b.qkv if attn else b.fc
            asked = {getattr(b, "backend", None), b.out_proj.backend, inner.backend}
            if blk.compute_dtype != torch.float32 or not asked <= {None, "cpp"}:
                return False
            if inner.bias is None or b.out_proj.bias is None:
                return False
            blocks.append(ops.DecodeBlock(b.kind if attn else None, b.norm.weight, b.norm.bias, b.norm.eps,
                                          inner.weight, inner.bias, b.out_proj.weight, b.out_proj.bias))  # fmt: skip
        head = ops.DecodeHead(m.norm.weight, m.norm.bias, m.norm.eps, m.head.weight[self.nt :], m.head.bias[self.nt :])
        c = self.c
        kw = {"n_heads": c.n_heads, "text_len": c.text_len, "grid_size": (c.grid_h, c.grid_w),
              "kernel": c.conv_kernel, "conv_variant": c.conv_variant, "dense": self.mode == "dense"}  # fmt: skip
        try:  # raises when cpp cannot serve it (no extension, a head size the kernel does not take, ...)
            self.fused = ops.bind_decode_step(blocks, head, self.k, self.v, backend="cpp", **kw)
        except ops.BackendUnavailable:
            return False
        return True

    def _attend(self, parts, x, pos):
        """The attention body at position pos (an int or a 0-dim device tensor) for x [B, 1, d]."""
        qkv, out, attend, layer, kind = parts
        c = self.c
        b, n, d = x.shape
        q, k, v = qkv(x).view(b, n, 3, c.n_heads, c.head_dim).unbind(2)  # [B, n, H, Dh] each
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(pos, torch.Tensor):
            idx = pos + torch.arange(n, device=pos.device)
            kc.index_copy_(1, idx, k)
            vc.index_copy_(1, idx, v)
        else:
            kc[:, pos : pos + n] = k
            vc[:, pos : pos + n] = v
        q = q.transpose(1, 2)
        if attend is None:  # dense: static shapes, every cache slot, the mask row hides the others
            mask = self._dense_mask(kind)[int(pos) : int(pos) + n]
            o = F.scaled_dot_product_attention(q, kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask)
        else:
            o = attend(q, kc.transpose(1, 2), vc.transpose(1, 2), pos)
        return out(o.transpose(1, 2).reshape(b, n, d))

    def _blocks(self, x, pos):
        # nothing here needs autograd (generate runs under no_grad): skip the dispatcher's autograd layer,
        # which for the extension's ops with Python-registered autograd is a round trip through Python
        guard = contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._AutoDispatchBelowAutograd()
        with guard:
            for what, dt, norm, parts in self._plan:
                h = F.layer_norm(x.to(dt), *norm)
                if what == "attn":
                    y = self._attend(parts, h, pos)
                else:
                    fc, out = parts
                    y = out(F.gelu(fc(h)))
                x = x + y.to(torch.float32)
        return x

    def _prefill_blocks(self, x):
        """Every resblock over the whole prefix with the training attention op, filling the cache."""
        c, layer = self.c, 0
        b, n, d = x.shape
        for blk in self.model.blocks:
            h = x.to(blk.compute_dtype)
            body = blk.block
            if hasattr(body, "qkv"):
                qkv = body.qkv(body.norm(h)).view(b, n, 3, c.n_heads, c.head_dim)
                self.k[layer][:, :n] = qkv[:, :, 1]
                self.v[layer][:, :n] = qkv[:, :, 2]
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                o = ops.sparse_attention(q, k, v, kind=body.kind, text_len=c.text_len, grid_size=(c.grid_h, c.grid_w),
                                         kernel=c.conv_kernel, conv_variant=c.conv_variant,
                                         backend=body.backend)  # fmt: skip
                y = body.out_proj(o.transpose(1, 2).reshape(b, n, d))
                layer += 1
            else:
                y = body(h)
            x = x + y.to(torch.float32)
        return x

    # -- the two entry points
    def prefill(self, text, prefix):
        """Logits [B, image_vocab] for image token `prefix.shape[1]`, the cache filled up to the prefix."""
        x = self._prefill_blocks(self.model.embed(text, prefix))
        return self._image_logits(x[:, -1])

    def step(self, token, index):
        """Feed image token `index` (int or 0-dim device tensor) of every sequence ([B] int64): the logits for
        image token index + 1."""
        c, m = self.c, self.model
        if isinstance(index, int):  # plain indexing: the embedding modules' calls cost more than a small step
            row, col = divmod(index, c.grid_w)
            x = m.image_emb.weight[token] + (m.image_row_emb.weight[row] + m.image_col_emb.weight[col])
        else:  # a device tensor (the CUDA graph's step); code + (row + column), in DALLE.embed's order
            x = m.image_emb(token) + (m.image_row_emb(index // c.grid_w) + m.image_col_emb(index % c.grid_w))
        if self._plan is None and self.fused is None:
            self._bind(token.shape[0], token.device)
        if self.fused is not None:
            return self.fused(x, c.text_len + int(index))
        x = self._blocks(x[:, None], c.text_len + index)[:, -1]
        shape, gain, bias, eps, w, b = self._head
        return F.linear(F.layer_norm(x, shape, gain, bias, eps), w, b)


class _GraphedStep:
    """The decoder's step captured in a CUDA graph: token and index are device tensors updated in place before
    each replay; the logits come back in the graph's static output."""

    def __init__(self, decoder: _Decoder, batch: int, first_index: int, device):
        self.token = torch.zeros(batch, dtype=torch.int64, device=device)
        self.index = torch.full((), first_index, dtype=torch.int64, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up (allocator, lazy init); it writes only slot first_index,
            for _ in range(2):  # which the first real step overwrites before anything reads it
                decoder.step(self.token, self.index)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(self.token, self.index)

    def __call__(self, token, index: int):
        self.token.copy_(token)
        self.index.fill_(index)
        self.graph.replay()
        return self.logits


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


@torch.no_grad()
def generate(model, text_tokens, *, num_samples=1, temperature=1.0, top_k=None, top_p=None, seed=None,
             image_prefix=None, guidance_scale=1.0, progress=False, cache="sparse", cuda_graph=None,
             backend=None):  # fmt: skip
    """Image codes for each caption: DALLE.generate (see there)."""
    c = model.config
    if not isinstance(text_tokens, torch.Tensor):
        raise TypeError(f"text_tokens: expected an int64 tensor [B, {c.text_len}] or [{c.text_len}], got "
                        f"{type(text_tokens).__name__}")  # fmt: skip
    single = text_tokens.dim() == 1
    text = text_tokens[None] if single else text_tokens
    _check_int(num_samples, "num_samples", 1)
    if cache not in CACHE_MODES:
        raise ValueError(f"cache: expected one of {CACHE_MODES}, got {cache!r}")
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if (
        not isinstance(guidance_scale, (int, float))
        or isinstance(guidance_scale, bool)
        or not (math.isfinite(guidance_scale) and guidance_scale >= 0)
    ):
        raise ValueError(f"guidance_scale: expected a finite number >= 0 (1: no guidance), got {guidance_scale!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    prefix = torch.zeros(text.shape[0], 0, dtype=torch.int64, device=text.device)
    if image_prefix is not None:
        if not isinstance(image_prefix, torch.Tensor):
            raise TypeError(f"image_prefix: expected an int64 tensor of codes, got {type(image_prefix).__name__}")
        prefix = image_prefix[None] if single else image_prefix
        if prefix.dim() == 3:
            prefix = prefix.flatten(1)
        if prefix.dim() != 2 or prefix.shape[1] >= c.image_len:
            raise ValueError(f"image_prefix: expected [B, m] codes (or [B, rows, {c.grid_w}]) with m < {c.image_len}, "
                             f"got shape {tuple(image_prefix.shape)}")  # fmt: skip
    prefix = model._check_tokens(text, prefix, c.image_len - 1)
    total, m0 = c.image_len, prefix.shape[1]
    text = text.repeat_interleave(num_samples, 0)
    prefix = prefix.repeat_interleave(num_samples, 0)
    batch, vocab = text.shape[0], c.image_vocab
    codes = torch.empty(batch, total, dtype=torch.int64, device=text.device)
    codes[:, :m0] = prefix
    guided = guidance_scale != 1
    if guided:  # the unconditional half: the same images after the empty caption (every position its pad)
        text = torch.cat([text, null_text(model, batch, text.device)])
        prefix = prefix.repeat(2, 1)
    report = _progress(progress, total - m0)
    saved_backend = model.backend
    if backend is not None:
        model.backend = backend
    try:
        if cache == "none":  # no cache at all: every step recomputes the prefix
            dec, logits = None, model.logits(text, prefix)[1][:, -1]
        else:
            dec = _Decoder(model, text.shape[0], cache, text.device)
            logits = dec.prefill(text, prefix)
        use_graph = (cuda_graph if cuda_graph is not None else text.device.type == "cuda") and cache == "sparse"
        graphed = None
        for i in range(m0, total):
            if guided:
                logits = _guide(logits, batch, guidance_scale)
            tok = ops.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             offset=i * batch * vocab, backend=backend)  # fmt: skip
            codes[:, i] = tok
            report(i - m0)
            if i + 1 == total:
                break
            fed = tok.repeat(2) if guided else tok
            if cache == "none":
                logits = model.logits(text, codes[:, : i + 1].repeat(2 if guided else 1, 1))[1][:, -1]
            elif use_graph:
                if graphed is None:
                    graphed = _GraphedStep(dec, fed.shape[0], i, text.device)
                logits = graphed(fed, i)
            else:
                logits = dec.step(fed, i)
    finally:
        model.backend = saved_backend
    out = codes.view(-1, num_samples, c.grid_h, c.grid_w)
    return out[0] if single else out


def null_text(model, batch: int = 1, device=None) -> torch.Tensor:
    """The empty caption [batch, text_len]: the pad of every position (what training with --text-dropout shows
    the model in place of a caption, and the unconditional half of classifier-free guidance)."""
    c = model.config
    return torch.arange(c.text_vocab, c.text_vocab + c.text_len, device=device).expand(batch, -1)


def _guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance: logits [2B, V] (conditional, then unconditional) -> u + scale * (c - u) [B, V],
    in fp32."""
    cond, uncond = logits[:batch].float(), logits[batch:].float()
    return torch.lerp(uncond, cond, scale)


def _progress(progress, total: int) -> Callable[[int], None]:
    if callable(progress):
        return lambda i: progress(i + 1, total)
    if progress:
        from ..training import Progress

        bar = Progress(total, every=max(1, total // 10), prefix="generate ")
        return lambda i: bar.update(i)
    return lambda i: None


# Reranking -----------------------------------------------------------------------------------------------


@torch.no_grad()
def image_log_likelihood(model, text_tokens, codes, *, batch_size: int = 16) -> torch.Tensor:
    """log p(image | text) under the model, fp32 [N]: the sum over the image tokens of the log-probability of
    each code given the text and the earlier codes. text_tokens [N, T], codes [N, H*W] or [N, H, W]."""
    codes = codes.flatten(1) if codes.dim() == 3 else codes
    out = []
    for s in range(0, codes.shape[0], batch_size):
        t, im = text_tokens[s : s + batch_size], codes[s : s + batch_size]
        logits = model.logits(t, im[:, :-1])[1]  # [b, H*W, V]
        out.append(-F.cross_entropy(logits.flatten(0, 1), im.reshape(-1), reduction="none").view(im.shape).sum(1))
    return torch.cat(out) if out else torch.zeros(0, device=codes.device)


def rerank(model, text_tokens, samples, *, scorer=None):
    """Order the samples of one caption best first. text_tokens [T]; samples [S, H, W] codes (what
    generate returns for one caption). scorer(text_tokens [S, T], samples [S, H, W]) -> scores [S] (higher is
    better); default: the model's own log-likelihood (image_log_likelihood). The paper reranks with CLIP: pass a
    CLIP-based scorer here when one is available. Returns (samples sorted best first, their scores)."""
    if samples.dim() != 3:
        raise ValueError(f"samples: expected codes [S, H, W] of one caption, got shape {tuple(samples.shape)}")
    if text_tokens.dim() != 1:
        raise ValueError(f"text_tokens: expected the [T] tokens of one caption, got shape {tuple(text_tokens.shape)}")
    text = text_tokens[None].expand(samples.shape[0], -1)
    if scorer is None:
        scores = image_log_likelihood(model, text, samples)
    else:
        scores = torch.as_tensor(scorer(text, samples), dtype=torch.float32, device=samples.device)
        if scores.shape != (samples.shape[0],):
            raise ValueError(f"scorer: expected scores of shape ({samples.shape[0]},), got {tuple(scores.shape)}")
    order = torch.argsort(scores, descending=True)
    return samples[order], scores[order]


def contrastive_scorer(model, negatives, *, batch_size: int = 16):
    """A scorer for rerank that uses the model as its own caption classifier (a stand-in for CLIP, whose weights
    cannot be fetched here): score(x) = log p(x | t) - logsumexp over t' in {t} + negatives of log p(x | t'), the
    log-posterior of the caption t among the candidates under a uniform prior. The likelihood alone prefers simple
    images (a mostly black image is likely after any caption); this prefers images that fit their caption better
    than they fit the others.

    negatives: int64 caption tokens [K, T] (the same for every caption), or a callable(text_tokens [T]) -> [K, T]
    (e.g. the caption with one word changed). The empty caption (null_text) is a natural negative for a model
    trained with some empty captions (train_dalle --text-dropout)."""

    def score(text, samples):
        neg = negatives(text[0]) if callable(negatives) else negatives
        if not isinstance(neg, torch.Tensor) or neg.dim() != 2 or neg.shape[0] < 1 or neg.shape[1] != text.shape[1]:
            got = tuple(neg.shape) if isinstance(neg, torch.Tensor) else type(neg).__name__
            raise ValueError(f"negatives: expected caption tokens [K >= 1, {text.shape[1]}], got {got}")
        s, k = samples.shape[0], neg.shape[0]
        ll = image_log_likelihood(model, text, samples, batch_size=batch_size)
        neg = neg.to(text.device).repeat_interleave(s, 0)
        lln = image_log_likelihood(model, neg, samples.repeat(k, 1, 1), batch_size=batch_size).view(k, s)
        return ll - torch.logsumexp(torch.cat([ll[None], lln]), 0)

    return score
