"""The discrete VAE of DALL-E (paper section 2.1, App. A; DESIGN section 5): the official OpenAI architecture.

`Encoder` and `Decoder` rebuild the `dall-e` package's modules (dall_e/encoder.py, decoder.py, utils.py) as
plain nn.Modules with the same parameter names (``blocks.group_1.block_1.res_path.conv_1.w`` ...), so an
official state_dict loads with strict=True and gives the same outputs. Precision follows the official code:
on CUDA every convolution runs in fp16 except the two 1x1 convolutions next to the 8192-way categorical
(the encoder's output, the decoder's input), which stay fp32; on CPU everything is fp32. (The official
classes carry a `use_mixed_precision` attribute that their code never reads: each official Conv2d decides
by its own use_float16 flag and its device. Here use_mixed_precision=True, the default, gives exactly that
behaviour, and False keeps every convolution fp32 on CUDA too.) Unlike the official encoder, which floors
odd sizes silently, ours refuses images whose height or width is not divisible by 8 (2**(group_count-1)).

`DiscreteVAE` adds what training needs (paper App. A.2, A.3): pixels mapped into (eps, 1 - eps), the
Gumbel-softmax relaxation fed to the decoder's codebook convolution, the logit-Laplace reconstruction NLL
and the KL to the uniform prior computed from the encoder logits, weighted by beta, all normalised by the
pixel count. The three steps go through small wrappers (`_gumbel_quantize`, `_logit_laplace_nll`,
`_categorical_kl_uniform`) around the fused ops dalle_fast.ops.gumbel_quantize, logit_laplace_nll and
categorical_kl_uniform; their backend is chosen like any op's (ops.use_backend, DALLE_FAST_BACKEND, or
automatically).
"""

import math
import numbers
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

LOGIT_LAPLACE_EPS = 0.1


# Pixels --------------------------------------------------------------------------------------------------


def _check_image_batch(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [batch, channels, height, width] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] -> (1 - 2 eps) x + eps in [0.1, 0.9] (paper Eq. 3 after division by 255; eps = 0.1).

    Keeps the logit-Laplace likelihood, whose support is the open interval (0, 1), away from its ends.
    """
    _check_image_batch(x, "x")
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of map_pixels, clamped to [0, 1]: reconstruct images with unmap_pixels(sigmoid(mu))."""
    _check_image_batch(x, "x")
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


# Building blocks -----------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: weight `w` [n_out, n_in, kw, kw] ~ N(0, 1/sqrt(n_in kw^2)), zero bias `b`,
    'same' padding. On CUDA with use_float16 (the official default) the input and the weights are cast to
    fp16 at forward time; otherwise the computation is fp32 (the input is cast to fp32)."""

    def __init__(self, n_in: int, n_out: int, kw: int, *, use_float16: bool = True, device=None, requires_grad=True):
        super().__init__()
        if n_in < 1 or n_out < 1 or kw < 1 or kw % 2 != 1:
            raise ValueError(f"Conv2d: expected n_in, n_out >= 1 and an odd kw, got {n_in}, {n_out}, {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16 = use_float16
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device)
        w.normal_(std=1 / math.sqrt(n_in * kw**2))
        b = torch.zeros((n_out,), dtype=torch.float32, device=device)
        self.w = nn.Parameter(w, requires_grad=requires_grad)
        self.b = nn.Parameter(b, requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_float16 and self.w.device.type == "cuda":
            x = x if x.dtype == torch.float16 else x.half()
            w, b = self.w.half(), self.b.half()
        else:
            x = x if x.dtype == torch.float32 else x.float()
            w, b = self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}, kw={self.kw}, use_float16={self.use_float16}"


class _ResBlock(nn.Module):
    """out = id_path(x) + post_gain * res_path(x), post_gain = 1 / n_layers^2, bottleneck n_out / 4."""

    # Kernel widths of the four convolutions of the residual path.
    KWS: tuple[int, int, int, int] = (3, 3, 3, 1)

    def __init__(self, n_in: int, n_out: int, n_layers: int, *, use_float16: bool, device, requires_grad: bool):
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"{type(self).__name__}: n_out must be a multiple of 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)

        def conv(a, b, kw):
            return Conv2d(a, b, kw, use_float16=use_float16, device=device, requires_grad=requires_grad)

        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        k1, k2, k3, k4 = self.KWS
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", conv(n_in, self.n_hid, k1)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", conv(self.n_hid, self.n_hid, k2)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", conv(self.n_hid, self.n_hid, k3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", conv(self.n_hid, n_out, k4)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_ResBlock):
    """dall_e.encoder.EncoderBlock: conv 3x3, 3x3, 3x3, 1x1 on the residual path."""

    KWS = (3, 3, 3, 1)


class DecoderBlock(_ResBlock):
    """dall_e.decoder.DecoderBlock: conv 1x1, 3x3, 3x3, 3x3 on the residual path."""

    KWS = (1, 3, 3, 3)


def _check_positive_int(value, name: str, minimum: int = 1, multiple_of: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or value % multiple_of:
        extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
        raise ValueError(f"{name}: expected an integer >= {minimum}{extra}, got {value!r}")
    return int(value)


# Encoder and decoder -------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """dall_e.encoder.Encoder: mapped pixels [B, input_channels, H, W] -> fp32 logits [B, vocab_size, H/f, W/f]
    with f = 2**(group_count - 1) (8 for the official 4 groups).

    input conv 7x7 (input_channels -> n_hid); group g = 1..group_count: n_blk_per_group EncoderBlocks to
    2**(g-1) n_hid channels, then a 2x2 max-pool (all groups but the last); output: ReLU and an fp32 1x1 conv
    to vocab_size logits. group_count=4 is the official architecture (whose class fixes it at 4); other
    values follow the same doubling pattern. The official constructor also demands n_hid >= 64 and
    vocab_size >= 512; this one accepts smaller models (n_hid a multiple of 4, vocab_size >= 2) for quick
    runs. use_mixed_precision=False keeps every convolution fp32 on CUDA as well.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
        *,
        device=None,
        requires_grad: bool = True,
        use_mixed_precision: bool = True,
    ):
        super().__init__()
        self.group_count = _check_positive_int(group_count, "group_count")
        self.n_hid = _check_positive_int(n_hid, "n_hid", 4, multiple_of=4)
        self.n_blk_per_group = _check_positive_int(n_blk_per_group, "n_blk_per_group")
        self.input_channels = _check_positive_int(input_channels, "input_channels")
        self.vocab_size = _check_positive_int(vocab_size, "vocab_size", 2)
        self.use_mixed_precision = bool(use_mixed_precision)
        n_layers = self.group_count * self.n_blk_per_group
        fp16 = self.use_mixed_precision
        kw = dict(device=device, requires_grad=requires_grad)

        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7, use_float16=fp16, **kw))]
        n_in = n_hid
        for g in range(self.group_count):
            n_out = 2**g * n_hid
            layers: list[tuple[str, nn.Module]] = []
            for i in range(self.n_blk_per_group):
                layers.append((f"block_{i + 1}", EncoderBlock(n_in, n_out, n_layers, use_float16=fp16, **kw)))
                n_in = n_out
            if g < self.group_count - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        output = [("relu", nn.ReLU()), ("conv", Conv2d(n_in, vocab_size, 1, use_float16=False, **kw))]
        groups.append(("output", nn.Sequential(OrderedDict(output))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.group_count - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_batch(x, "x")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"x: expected {self.input_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: expected height and width divisible by {f}, got {x.shape[2]}x{x.shape[3]}")
        return self.blocks(x)


class Decoder(nn.Module):
    """dall_e.decoder.Decoder: codes [B, vocab_size, h, w] (one-hots, or relaxed one-hots while training)
    -> statistics [B, 2 output_channels, h f, w f]: mu for each channel, then ln b for each channel.

    input: an fp32 1x1 conv vocab_size -> n_init (the codebook); group g = 1..group_count: n_blk_per_group
    DecoderBlocks to 2**(group_count-g) n_hid channels, then 2x nearest upsampling (all groups but the last);
    output: ReLU and a 1x1 conv to 2 output_channels. On CUDA with mixed precision the output is fp16, as
    the official decoder's. The official constructor demands n_init >= 8, n_hid >= 64, vocab_size >= 512;
    this one accepts smaller models.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
        *,
        device=None,
        requires_grad: bool = True,
        use_mixed_precision: bool = True,
    ):
        super().__init__()
        self.group_count = _check_positive_int(group_count, "group_count")
        self.n_init = _check_positive_int(n_init, "n_init")
        self.n_hid = _check_positive_int(n_hid, "n_hid", 4, multiple_of=4)
        self.n_blk_per_group = _check_positive_int(n_blk_per_group, "n_blk_per_group")
        self.output_channels = _check_positive_int(output_channels, "output_channels")
        self.vocab_size = _check_positive_int(vocab_size, "vocab_size", 2)
        self.use_mixed_precision = bool(use_mixed_precision)
        n_layers = self.group_count * self.n_blk_per_group
        fp16 = self.use_mixed_precision
        kw = dict(device=device, requires_grad=requires_grad)

        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(vocab_size, n_init, 1, use_float16=False, **kw))]
        n_in = n_init
        for g in range(self.group_count):
            n_out = 2 ** (self.group_count - 1 - g) * n_hid
            layers: list[tuple[str, nn.Module]] = []
            for i in range(self.n_blk_per_group):
                layers.append((f"block_{i + 1}", DecoderBlock(n_in, n_out, n_layers, use_float16=fp16, **kw)))
                n_in = n_out
            if g < self.group_count - 1:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        output = [("relu", nn.ReLU()), ("conv", Conv2d(n_in, 2 * output_channels, 1, use_float16=fp16, **kw))]
        groups.append(("output", nn.Sequential(OrderedDict(output))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    @property
    def upsample_factor(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def codebook(self) -> Conv2d:
        """The input 1x1 convolution: weight [n_init, vocab_size, 1, 1], one n_init-vector per code."""
        return self.blocks.input

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_image_batch(z, "z")
        if z.shape[1] != self.vocab_size:
            raise ValueError(f"z: expected {self.vocab_size} channels (vocab_size), got {z.shape[1]}")
        return self.blocks(z)

    def forward_embedded(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder after its input convolution, on h = codebook(z) [B, n_init, h, w]."""
        _check_image_batch(h, "h")
        if h.shape[1] != self.n_init:
            raise ValueError(f"h: expected {self.n_init} channels (n_init), got {h.shape[1]}")
        for name, module in self.blocks.named_children():
            if name != "input":
                h = module(h)
        return h


# The discrete VAE ----------------------------------------------------------------------------------------


def _gumbel_quantize(logits, weight, bias, *, tau, hard, seed, offset):
    """codebook(gumbel_softmax(logits, dim=1)), fused (dalle_fast.ops.gumbel_quantize): the backend comes from
    ops.use_backend / DALLE_FAST_BACKEND / the automatic choice, like every op the modules call."""
    return ops.gumbel_quantize(logits, weight, bias, tau=tau, hard=hard, seed=seed, offset=offset)


def _logit_laplace_nll(x, mu, log_b):
    return ops.logit_laplace_nll(x, mu, log_b, reduction="mean")


def _categorical_kl_uniform(logits):
    return ops.categorical_kl_uniform(logits, dim=1, reduction="mean")


class DVAEOutput(NamedTuple):
    """What DiscreteVAE.forward returns. loss = recon_nll + beta * kl * (code positions / subpixels)."""

    loss: torch.Tensor  # scalar: the negative ELB (beta-weighted) per subpixel
    recon_nll: torch.Tensor  # scalar: logit-Laplace NLL per subpixel (nats), mean over B*C*H*W
    kl: torch.Tensor  # scalar: KL(q || uniform) per code position (nats), mean over B*h*w
    logits: torch.Tensor  # [B, vocab_size, h, w] fp32 encoder logits
    stats: torch.Tensor  # [B, 2C, H, W] fp32 decoder output: mu, then ln b


class DiscreteVAE(nn.Module):
    """The dVAE: images in [0, 1] <-> tokens. encode / get_codebook_indices / decode, and a training forward.

    forward(x, tau=, beta=, seed=) computes, for images x [B, C, H, W] in [0, 1]:
      x' = map_pixels(x); logits = encoder(x'); h = codebook(gumbel_softmax(logits / tau, dim=1));
      (mu, ln b) = decoder_after_codebook(h);
      recon_nll = mean over subpixels of -ln f(x' | mu, b), f the logit-Laplace density (paper App. A.3):
          -ln f = |logit(x') - mu| / b + ln b + ln x' + ln(1 - x') + ln 2;
      kl = mean over code positions of KL(softmax(logits) || uniform) = sum_k q_k ln q_k + ln K;
      loss = recon_nll + beta * kl * (h w) / (C H W)
    i.e. (sum of NLLs + beta * sum of KLs) / (B C H W): the paper's loss normalised by the pixel count,
    where the KL weight becomes beta / 192 at 256x256x3 with 32x32 codes. The KL is taken from the encoder
    logits as a categorical (not from the relaxed sample), as OpenAI did (openai/DALL-E#26).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        if not isinstance(encoder, Encoder) or not isinstance(decoder, Decoder):
            raise TypeError(
                f"DiscreteVAE: expected a dalle_fast.nn.Encoder and Decoder, got {type(encoder).__name__} and "
                f"{type(decoder).__name__}"
            )
        if encoder.vocab_size != decoder.vocab_size:
            raise ValueError(f"vocab_size: encoder has {encoder.vocab_size}, decoder {decoder.vocab_size}")
        if encoder.input_channels != decoder.output_channels:
            raise ValueError(
                f"channels: encoder takes {encoder.input_channels}, decoder makes {decoder.output_channels}"
            )
        if encoder.downsample_factor != decoder.upsample_factor:
            raise ValueError(
                f"group_count: the encoder downsamples by {encoder.downsample_factor}, the decoder upsamples by "
                f"{decoder.upsample_factor}"
            )
        self.encoder = encoder
        self.decoder = decoder

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def channels(self) -> int:
        return self.encoder.input_channels

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    def _check_images(self, x) -> None:
        _check_image_batch(x, "x")
        if x.shape[1] != self.channels:
            raise ValueError(f"x: expected {self.channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: expected height and width divisible by {f}, got {x.shape[2]}x{x.shape[3]}")
        if x.numel() == 0:
            raise ValueError(f"x: expected a non-empty batch, got shape {tuple(x.shape)}")
        outside = ~((x >= 0) & (x <= 1))  # NaN compares false: counted here too
        if bool(outside.any()):
            nonfinite = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"x: expected finite pixel values in [0, 1], found {nonfinite} non-finite and "
                f"{int(outside.sum()) - nonfinite} finite values outside [0, 1]"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> fp32 logits [B, vocab_size, H/8, W/8] (pixels mapped inside)."""
        self._check_images(x)
        return self.encoder(map_pixels(x)).float()

    @torch.no_grad()
    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> int64 tokens [B, H/8, W/8]: the argmax of the logits, as the paper tokenizes (no noise)."""
        return self.encode(x).argmax(dim=1)

    def decode_stats(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens [B, h, w] -> fp32 decoder statistics [B, 2C, 8h, 8w] (mu, then ln b).

        The codebook convolution of a one-hot is a column of its weight: looked up, never materialising the
        [B, vocab_size, h, w] one-hots.
        """
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() != 3:
            raise ValueError(f"indices: expected a 3-D [batch, height, width] tensor, got shape {tuple(indices.shape)}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"indices: expected an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.vocab_size):
            raise ValueError(
                f"indices: expected values in [0, {self.vocab_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        cb = self.decoder.codebook
        table = cb.w.reshape(cb.w.shape[0], cb.w.shape[1]).t()  # [vocab_size, n_init]
        h = F.embedding(indices.long(), table) + cb.b  # [B, h, w, n_init]
        return self.decoder.forward_embedded(h.permute(0, 3, 1, 2)).float()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens [B, h, w] -> images [B, C, 8h, 8w] in [0, 1]: unmap_pixels(sigmoid(mu)) (paper App. A.3)."""
        stats = self.decode_stats(indices)
        return unmap_pixels(torch.sigmoid(stats[:, : self.channels]))

    def forward(self, x: torch.Tensor, *, tau: float, beta: float, seed=None, offset: int = 0, hard: bool = False):
        """The training objective for images x [B, C, H, W] in [0, 1]; returns a DVAEOutput (see the class)."""
        self._check_images(x)
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta: expected a finite number >= 0, got {beta!r}")
        xm = map_pixels(x.float())
        logits = self.encoder(xm).float()
        cb = self.decoder.codebook
        h = _gumbel_quantize(logits, cb.w, cb.b, tau=tau, hard=hard, seed=seed, offset=offset)
        stats = self.decoder.forward_embedded(h).float()
        mu, log_b = stats[:, : self.channels], stats[:, self.channels :]
        recon_nll = _logit_laplace_nll(xm, mu, log_b)
        kl = _categorical_kl_uniform(logits)
        ratio = (logits.shape[2] * logits.shape[3]) / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = recon_nll + beta * ratio * kl
        return DVAEOutput(loss, recon_nll, kl, logits, stats)
