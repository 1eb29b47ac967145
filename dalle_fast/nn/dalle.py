"""The DALL-E transformer (paper section 2.2, App. B; DESIGN sections 4 and 6; issue 6).

A decoder-only sparse transformer over T text tokens followed by an H x W grid of image tokens in raster order
(paper: T = 256 over a 16384 BPE vocabulary, 32 x 32 dVAE codes over 8192).

Sequence and targets. The full sequence has L = T + H*W tokens; the model reads its first L - 1 and position
i predicts token i + 1. Positions 0 .. T-2 predict text tokens 1 .. T-1 (logits over the text vocabulary,
pads included); positions T-1 .. L-2 predict the H*W image tokens (logits over the image vocabulary): the last
text position predicts the first image token. Text token 0 is never predicted.

Text. Token ids [0, text_vocab) are BPE tokens; the pad at text position j is its own token, id
text_vocab + j (one learned padding token per position, paper section 2.2): pads are embedded, attended to and
predicted by the text loss like any token, never masked. A text token is its embedding plus a learned
position embedding. Image token: its embedding plus the embeddings of its row and its column.

Resblocks (pre-norm). Layer l (1..n) is an attention resblock, x + out_proj(attn(qkv(norm(x)))), whose
attention is dalle_fast.ops.sparse_attention with the layer's mask kind (masks.layer_schedule: row / column,
conv last), followed by an MLP resblock, x + out_proj(gelu(fc(norm(x)))); 2n resblocks in all (128 for the
paper, one gradient scale each). The residual (identity) stream is fp32; each resblock casts its input to
`compute_dtype` at entry and its output back to fp32 at exit (DESIGN section 6). Projections and MLP are
ScaledLinear layers (fp32 master weights, compute_dtype math); norm gains and biases, embeddings, the final
norm and the output head are fp32 and the logits are computed in fp32. With a PerResblockGradScaler
(dalle_fast.amp) each resblock is a ScaledResidual with its own gradient scale (block 2(l-1) the attention of
layer l, 2(l-1)+1 its MLP); without one, a plain residual.

Output head. One linear map to text_vocab + text_len + image_vocab classes (text tokens, pads, image codes);
text positions use its first text_vocab + text_len rows, image positions the remaining image_vocab rows, so
neither kind pays for the other's logits. The loss is computed by dalle_fast.ops.linear_cross_entropy (chunked,
never holding the [B, L, vocab] logits for backward):

    loss = text_loss_weight * CE_text / (B * (T - 1)) + image_loss_weight * CE_image / (B * H * W)

(each cross-entropy summed over its positions and divided by the number of tokens of its kind that the batch
predicts; paper weights 1/8 and 7/8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import masks, ops
from ..amp import PerResblockGradScaler, ScaledResidual
from ..reference.masks import CONV_VARIANTS
from .linear import ScaledLinear

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


# Configuration -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DALLEConfig:
    """Architecture and loss weights of a DALL-E transformer. Presets: dalle_v1(), mid(), tiny().

    layer_kinds: the attention mask kind of each layer (None: the paper's schedule, masks.layer_schedule);
    conv_kernel / conv_variant: the conv layers' window (DESIGN section 4); loss_chunk: rows per chunk of the
    loss head (its peak extra memory is loss_chunk x vocabulary fp32 logits).
    """

    n_layers: int = 64
    n_heads: int = 62
    head_dim: int = 64
    text_len: int = 256
    text_vocab: int = 16384
    grid_h: int = 32
    grid_w: int = 32
    image_vocab: int = 8192
    conv_kernel: int = 11
    conv_variant: str = "clipped"
    mlp_ratio: int = 4
    norm_eps: float = 1e-5
    text_loss_weight: float = 1 / 8
    image_loss_weight: float = 7 / 8
    layer_kinds: tuple[str, ...] | None = None
    loss_chunk: int = 1024

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        for name in ("n_layers", "n_heads", "head_dim", "text_vocab", "grid_h", "grid_w", "image_vocab", "mlp_ratio",
                     "loss_chunk"):  # fmt: skip
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"DALLEConfig: {name}: expected an int >= 1, got {v!r}")
        if not is_int(self.text_len) or self.text_len < 2:
            raise ValueError(f"DALLEConfig: text_len: expected an int >= 2, got {self.text_len!r}")
        if not is_int(self.conv_kernel) or self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"DALLEConfig: conv_kernel: expected an odd int >= 1, got {self.conv_kernel!r}")
        if self.conv_variant not in CONV_VARIANTS:
            raise ValueError(f"DALLEConfig: conv_variant: expected one of {CONV_VARIANTS}, got {self.conv_variant!r}")
        for name in ("norm_eps", "text_loss_weight", "image_loss_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"DALLEConfig: {name}: expected a finite number >= 0, got {v!r}")
        if self.layer_kinds is not None:
            kinds = tuple(self.layer_kinds)
            if len(kinds) != self.n_layers or any(k not in masks.KINDS for k in kinds):
                raise ValueError(
                    f"DALLEConfig: layer_kinds: expected None or {self.n_layers} kinds from {masks.KINDS}, "
                    f"got {self.layer_kinds!r}"
                )
            object.__setattr__(self, "layer_kinds", kinds)

    @property
    def d_model(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def image_len(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def seq_len(self) -> int:
        """Tokens of a full sequence, T + H*W; the model reads the first seq_len - 1."""
        return self.text_len + self.image_len

    @property
    def n_text_classes(self) -> int:
        """Text logits: the BPE vocabulary and the text_len per-position pads."""
        return self.text_vocab + self.text_len

    @property
    def kinds(self) -> list[str]:
        """The attention mask kind of each layer, first to last."""
        return list(self.layer_kinds) if self.layer_kinds is not None else masks.layer_schedule(self.n_layers)

    def to_dict(self) -> dict:
        """Plain Python values (for self-contained checkpoints); DALLEConfig(**d) rebuilds it."""
        d = dataclasses.asdict(self)
        if d["layer_kinds"] is not None:
            d["layer_kinds"] = list(d["layer_kinds"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DALLEConfig:
        d = dict(d)
        if d.get("layer_kinds") is not None:
            d["layer_kinds"] = tuple(d["layer_kinds"])
        return cls(**d)

    @classmethod
    def dalle_v1(cls, **overrides) -> DALLEConfig:
        """The paper's 12B model: 64 layers, 62 heads of 64 (d_model 3968), 256 text tokens over 16384, 32x32
        image tokens over 8192, 11x11 clipped conv in the last layer."""
        return cls(**overrides)

    @classmethod
    def mid(cls, **overrides) -> DALLEConfig:
        """Benchmark size, same sequence layout: 24 layers, 16 heads of 64 (d_model 1024)."""
        return cls(**{"n_layers": 24, "n_heads": 16, "head_dim": 64, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> DALLEConfig:
        """Tests and CPU demos: 4 layers, 4 heads of 32 (d_model 128), 16 text tokens over 512, 8x8 image tokens
        over 128 codes, 5x5 conv."""
        base = dict(n_layers=4, n_heads=4, head_dim=32, text_len=16, text_vocab=512, grid_h=8, grid_w=8,
                    image_vocab=128, conv_kernel=5, loss_chunk=256)  # fmt: skip
        return cls(**{**base, **overrides})


class DALLELoss(NamedTuple):
    loss: torch.Tensor  # the weighted sum
    text_loss: torch.Tensor  # mean cross-entropy per predicted text token (pads included)
    image_loss: torch.Tensor  # mean cross-entropy per image token


# Building blocks -----------------------------------------------------------------------------------------


def _linear(in_f, out_f, compute_dtype, backend, device):
    return ScaledLinear(in_f, out_f, device=device, compute_dtype=compute_dtype, backend=backend)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with fp32 gain and bias that normalises in its input's dtype (fp16 inside a resblock;
    the statistics are accumulated in fp32 by torch's kernel)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Attention(nn.Module):
    """norm -> qkv -> sparse attention of the layer's kind -> out_proj (the body of an attention resblock)."""

    def __init__(self, config: DALLEConfig, kind: str, *, compute_dtype, backend=None, device=None):
        super().__init__()
        d = config.d_model
        self.config, self.kind, self.backend = config, kind, backend
        self.norm = LayerNorm(d, eps=config.norm_eps, device=device, dtype=torch.float32)
        self.qkv = _linear(d, 3 * d, compute_dtype, backend, device)
        self.out_proj = _linear(d, d, compute_dtype, backend, device)

    def forward(self, x):
        c = self.config
        b, n, d = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, 3, c.n_heads, c.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, n, Dh] views
        o = ops.sparse_attention(
            q, k, v, kind=self.kind, text_len=c.text_len, grid_size=(c.grid_h, c.grid_w), kernel=c.conv_kernel,
            conv_variant=c.conv_variant, backend=self.backend,
        )  # fmt: skip
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))  # a free view for the kernels' [B, L, H, D]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class MLP(nn.Module):
    """norm -> fc (d -> mlp_ratio d) -> gelu -> out_proj (the body of an MLP resblock)."""

    def __init__(self, config: DALLEConfig, *, compute_dtype, backend=None, device=None):
        super().__init__()
        d, h = config.d_model, config.mlp_ratio * config.d_model
        self.norm = LayerNorm(d, eps=config.norm_eps, device=device, dtype=torch.float32)
        self.fc = _linear(d, h, compute_dtype, backend, device)
        self.out_proj = _linear(h, d, compute_dtype, backend, device)

    def forward(self, x):
        return self.out_proj(F.gelu(self.fc(self.norm(x))))


class Residual(nn.Module):
    """x -> x + block(x in compute_dtype) in fp32: a resblock without gradient scaling (bf16, fp32)."""

    def __init__(self, block: nn.Module, compute_dtype):
        super().__init__()
        self.block, self.compute_dtype = block, compute_dtype

    def forward(self, x):
        return x + self.block(x.to(self.compute_dtype)).to(torch.float32)


# The model -----------------------------------------------------------------------------------------------


class DALLE(nn.Module):
    """The DALL-E transformer (module doc).

    DALLE(config, *, compute_dtype=None, scaler=None, backend=None, checkpoint=False, device=None)
        compute_dtype  dtype inside the resblocks: torch.float16 (with a scaler), torch.bfloat16, torch.float32
                       (or float64 with the eager backend, for tests). None: float16 with a scaler, else float32.
        scaler         a dalle_fast.amp.PerResblockGradScaler with 2 * n_layers blocks on the model's device
                       (its scales are read by the kernels there), or None.
        backend        the backend of every op the model calls (None: automatic); settable later (`.backend`).
                       The loss head (ops.linear_cross_entropy, chunked) runs on it too.
        checkpoint     recompute each resblock in backward (activation checkpointing); settable later.
        device         where to create the parameters ("meta" allocates nothing).

    model(text, image) -> DALLELoss; model.logits(text, image_prefix) for the dense logits (tests, sampling).
    text: int64 [B, T]; image: int64 [B, H*W] or [B, H, W] (codes in raster order).
    """

    def __init__(self, config: DALLEConfig, *, compute_dtype=None, scaler=None, backend=None, checkpoint=False,
                 device=None):  # fmt: skip
        super().__init__()
        if not isinstance(config, DALLEConfig):
            raise TypeError(f"config: expected a DALLEConfig, got {type(config).__name__}")
        if compute_dtype is None:
            compute_dtype = torch.float16 if scaler is not None else torch.float32
        if isinstance(compute_dtype, str):
            compute_dtype = _DTYPES.get(compute_dtype, compute_dtype)
        if compute_dtype not in _DTYPES.values():
            raise TypeError(f"compute_dtype: expected float16, bfloat16, float32 or float64, got {compute_dtype!r}")
        self.config, self.compute_dtype, self.checkpoint = config, compute_dtype, bool(checkpoint)
        self._backend = backend
        c, d = config, config.d_model
        fp32 = {"device": device, "dtype": torch.float32}
        self.text_emb = nn.Embedding(c.n_text_classes, d, **fp32)  # BPE tokens, then one pad per position
        self.text_pos_emb = nn.Embedding(c.text_len, d, **fp32)
        self.image_emb = nn.Embedding(c.image_vocab, d, **fp32)
        self.image_row_emb = nn.Embedding(c.grid_h, d, **fp32)
        self.image_col_emb = nn.Embedding(c.grid_w, d, **fp32)
        if scaler is not None:
            if not isinstance(scaler, PerResblockGradScaler):
                raise TypeError(f"scaler: expected a dalle_fast.amp.PerResblockGradScaler, got {type(scaler).__name__}")
            if scaler.n_blocks != 2 * c.n_layers:
                raise ValueError(f"scaler: expected n_blocks = 2 * n_layers = {2 * c.n_layers}, got {scaler.n_blocks}")
        self.scaler = scaler
        blocks = []
        for i, kind in enumerate(c.kinds):
            attn = Attention(c, kind, compute_dtype=compute_dtype, backend=backend, device=device)
            mlp = MLP(c, compute_dtype=compute_dtype, backend=backend, device=device)
            for j, body in enumerate((attn, mlp)):
                if scaler is None:
                    blocks.append(Residual(body, compute_dtype))
                else:
                    blocks.append(ScaledResidual(body, scaler, 2 * i + j, out_proj=body.out_proj,
                                                 compute_dtype=compute_dtype, backend=backend))  # fmt: skip
        self.blocks = nn.ModuleList(blocks)  # attention and MLP resblocks alternating, 2 per layer
        self.norm = nn.LayerNorm(d, eps=c.norm_eps, **fp32)
        self.head = nn.Linear(d, c.n_text_classes + c.image_vocab, **fp32)
        self.reset_parameters()

    # -- parameters
    def reset_parameters(self) -> None:
        """GPT-2 style: normal(0, 0.02) weights and embeddings, output projections of the resblocks scaled by
        1 / sqrt(2 n_layers), zero biases, unit norm gains. (The paper does not give its initialisation.)"""
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Linear, ScaledLinear)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                nn.init.normal_(m.out_proj.weight, std=std / math.sqrt(2 * self.config.n_layers))

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, name) -> None:
        """Route every op of the model (attention, matmuls, the resblocks' scaling passes) to `name`."""
        self._backend = name
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = name

    @property
    def layer_kinds(self) -> list[str]:
        """The attention kind each layer's attention resblock uses."""
        return [blk.block.kind for blk in self.blocks if isinstance(blk.block, Attention)]

    # -- inputs
    def _check_tokens(self, text, image, max_image: int):
        c = self.config
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[1] != c.text_len:
            raise ValueError(f"text: expected an int64 tensor [B, {c.text_len}], got {_describe(text)}")
        if text.dtype != torch.int64:
            raise TypeError(f"text: expected int64 token ids, got {text.dtype}")
        if not isinstance(image, torch.Tensor) or image.dtype != torch.int64:
            raise TypeError(f"image: expected an int64 tensor of codes, got {_describe(image)}")
        if image.dim() == 3 and tuple(image.shape[1:]) == (c.grid_h, c.grid_w):
            image = image.flatten(1)
        if image.dim() != 2 or image.shape[0] != text.shape[0] or image.shape[1] > max_image:
            raise ValueError(
                f"image: expected codes [B, n] with n <= {max_image} (or [B, {c.grid_h}, {c.grid_w}]) and text's batch "
                f"size {text.shape[0]}, got shape {tuple(image.shape)}"
            )
        if image.device != text.device:
            raise ValueError(f"image: expected text's device {text.device}, got {image.device}")
        if torch.compiler.is_compiling() or text.device.type == "meta":
            return image
        pos = torch.arange(c.text_len, device=text.device)
        bad = ((text < 0) | (text >= c.text_vocab)) & (text != c.text_vocab + pos)
        if bool(bad.any()):
            b, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"text: expected token ids in [0, {c.text_vocab}) or the pad of the position (text_vocab + position), "
                f"got {int(text[b, j])} at batch {b}, position {j} (its pad is {c.text_vocab + j})"
            )
        if image.numel():
            lo, hi = int(image.min()), int(image.max())
            if lo < 0 or hi >= c.image_vocab:
                raise ValueError(f"image: expected codes in [0, {c.image_vocab}), got {lo if lo < 0 else hi}")
        return image

    def embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """fp32 [B, T + n, d]: the embeddings of text [B, T] followed by image codes [B, n] (raster order)."""
        c = self.config
        x = self.text_emb(text) + self.text_pos_emb.weight
        n = image.shape[1]
        if n == 0:
            return x
        i = torch.arange(n, device=image.device)
        pos = self.image_row_emb(i // c.grid_w) + self.image_col_emb(i % c.grid_w)
        return torch.cat([x, self.image_emb(image) + pos], dim=1)

    def hidden(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The final normed states, fp32 [B, T + n, d], for text [B, T] and an image prefix [B, n], n <= H*W."""
        return self._hidden(text, self._check_tokens(text, image, self.config.image_len))

    def _hidden(self, text, image):
        x = self.embed(text, image)
        recompute = self.checkpoint and torch.is_grad_enabled()
        for blk in self.blocks:
            x = _checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return self.norm(x)

    # -- outputs
    def logits(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense fp32 logits for text [B, T] and an image prefix [B, n], n <= H*W - 1: (text logits [B, T-1,
        text_vocab + text_len] predicting text tokens 1..T-1, image logits [B, n+1, image_vocab] predicting image
        tokens 0..n). Materialises them all: for sampling and tests; training uses forward()."""
        c = self.config
        h = self._hidden(text, self._check_tokens(text, image, c.image_len - 1))
        w, b = self.head.weight, self.head.bias
        nt = c.n_text_classes
        return F.linear(h[:, : c.text_len - 1], w[:nt], b[:nt]), F.linear(h[:, c.text_len - 1 :], w[nt:], b[nt:])

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> DALLELoss:
        """The training loss for text [B, T] and image codes [B, H*W] (or [B, H, W]); module doc."""
        c = self.config
        image = self._check_tokens(text, image, c.image_len)
        if image.shape[1] != c.image_len:
            raise ValueError(f"image: expected all {c.image_len} codes of each image, got {image.shape[1]}")
        h = self._hidden(text, image[:, :-1])
        d, nt = c.d_model, c.n_text_classes
        w, b = self.head.weight, self.head.bias
        text_target, n_text = text[:, 1:].reshape(-1), text.shape[0] * (c.text_len - 1)
        text_sum = ops.linear_cross_entropy(h[:, : c.text_len - 1].reshape(-1, d), w[:nt], b[:nt], text_target,
                                            chunk_size=c.loss_chunk, backend=self._backend)  # fmt: skip
        image_sum = ops.linear_cross_entropy(h[:, c.text_len - 1 :].reshape(-1, d), w[nt:], b[nt:], image.reshape(-1),
                                             chunk_size=c.loss_chunk, backend=self._backend)  # fmt: skip
        text_loss = text_sum / max(n_text, 1)
        image_loss = image_sum / max(image.numel(), 1)
        return DALLELoss(c.text_loss_weight * text_loss + c.image_loss_weight * image_loss, text_loss, image_loss)

    def generate(self, text_tokens, *, num_samples=1, temperature=1.0, top_k=None, top_p=None, seed=None,
                 image_prefix=None, guidance_scale=1.0, progress=False, cache="sparse", cuda_graph=None,
                 backend=None):  # fmt: skip
        """Sample image codes for captions (dalle_fast.nn.decoding: cached, mask-aware decoding).

        text_tokens  int64 [B, T] (or [T]): the captions' tokens (pads included, as TextTokenizer.encode gives)
        num_samples  images per caption
        temperature, top_k, top_p, seed
                     dalle_fast.ops.sample's filtering and noise (top_k=1: greedy); seed=None draws one from
                     torch's generator; the same seed gives the same images on a given backend
        image_prefix int64 codes [B, m] or [B, rows, W] (or without B for [T] text): given first codes (the
                     paper's image priming), m < H*W
        guidance_scale classifier-free guidance (not in the paper): each step samples from u + s * (c - u), c and
                     u the logits after the caption and after the empty caption (every position its pad). 1: off;
                     > 1 follows the caption more closely. Needs a model trained with some empty captions
                     (train_dalle --text-dropout); costs a second sequence per sample
        progress     True: a progress line on stderr; a callable(done, total): called after each token
        cache        "sparse" (default), "dense" or "none": the attention of a step (tests and benchmarks)
        cuda_graph   capture the step in a CUDA graph (default: on CUDA with the sparse cache)
        backend      the backend for this call (None: the model's)
        Returns int64 codes [B, num_samples, H, W] ([num_samples, H, W] for [T] text); decode them with the dVAE.
        """
        from .decoding import generate

        return generate(self, text_tokens, num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, image_prefix=image_prefix, guidance_scale=guidance_scale, progress=progress,
                        cache=cache, cuda_graph=cuda_graph, backend=backend)  # fmt: skip


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
