"""Train the discrete VAE (paper section 2.1, App. A.2): `python -m dalle_fast.train_dvae [--data synthetic|PATH]`.

    python -m dalle_fast.train_dvae --out runs/dvae                 # synthetic shapes, 32x32, ~15-20 min (--threads 1)
    python -m dalle_fast.train_dvae --data ~/images --image-size 256 --preset openai --out runs/big
    torchrun --nproc-per-node 2 -m dalle_fast.train_dvae --out runs/ddp          # DDP (gloo on CPU, NCCL on GPU)
    python -m dalle_fast.train_dvae --out runs/dvae --resume auto   # continue from runs/dvae/dvae.pt

What a step does (the paper's recipe, scaled down by default): images x in [0, 1] -> DiscreteVAE.forward with
the Gumbel-softmax temperature tau (cosine 1 -> 1/16 over --tau-steps), the KL weight beta (cosine 0 -> 6.6
over --beta-steps, its own shorter horizon, as the paper's 5k updates against tau's 150k) and a Gumbel seed
training.step_seed(seed, step, rank); AdamW (beta1 0.9, beta2 0.999, eps 1e-8, weight decay 1e-4, App. A.2)
with the step size cosine from --lr to --lr-end over --lr-steps; EMA of the weights (training.EMA). On CUDA the
convolutions run in fp16 (the official mixed precision) with loss scaling (torch.amp.GradScaler); a CPU run is
fp32 throughout and is exactly reproducible.

Output (rank 0 only), in --out: `dvae.pt`, written atomically every --ckpt-every steps and at the end
(format "dalle_fast.dvae/1": model, optimizer, EMA, grad scaler, step, args, model config, RNG states;
loads with weights_only=True); `recon_STEP.png` every --grid-every steps and at the end: originals (top
row) over their reconstructions from the argmax codes (bottom row), as the paper tokenizes.

Exact resume: the batch of a step is training.StepSampler's (a pure function of seed, step, rank), the noise
seed training.step_seed's, the schedules functions of the step; everything else that changes is in the
checkpoint. A CPU run interrupted after step s and resumed with --resume gives bit-identical parameters to
the uninterrupted run at every later step (tested). --stop-after N ends a run after N steps as an interruption
would (checkpoint written, schedules still planned for --steps).

Codebook usage: the progress line shows `ppl`, the perplexity exp(H) of the histogram of the batch's argmax
codes (vocab_size if all codes were equally used), and `codes`, the number of distinct codes in the batch; at
the end the same figures over the first --eval-images images, with the mean squared error of their argmax
reconstructions. On the synthetic shapes most tokens are black background, so a healthy model still has a
modest perplexity; `codes` says more.

The small default and why (measured on 2 shared CPU cores; README.md, "Training the dVAE", has the figures): runs at
32x32 -> 4x4 tokens and 64x64 -> 8x8 tokens (tokens of 8x8 pixels) kept all-black argmax reconstructions and
2-9 codes over their first 200-600 steps, with or without the KL term. A likely reason: the location a Laplace
likelihood fits is a median, and a token of 8x8 pixels around a small object is mostly black, so until the codes
are precise the decoder's best answer is black. The default therefore uses tokens of 4x4 pixels (group_count 3:
32x32 images -> 8x8 tokens, objects cover whole tokens), 512 codes, n_hid 32, a step size of 3e-3 (the paper's
1e-4 is for a 100x larger model and a far longer run; 1e-3 learned visibly slower here), codebook vectors
initialised with std 1 (--codebook-std; the official init gives them std 1/sqrt(vocab_size), --codebook-std 0)
the KL weight raised over the first tenth of the run, and dequantization noise U(0, 1/64) added to the training
pixels (--pixel-noise; the paper adds none, --pixel-noise 0). Pass --group-count 4 for the paper's 8x downsampling
(the same 1500-step run with it used 6 codes against the 1500-step default's 42 and reconstructed dim smudges). Usage
stays far below the vocabulary in a run this short.

Reconstruction quality (measured; README.md, "Reconstruction quality", has every run): the final evaluation also
reads the argmax reconstructions of --check-images held-out scenes (SyntheticShapes "test": colour/shape pairs the
training split lacks) back with data.check and prints the fraction right per attribute (count, shape, colour,
position, all), raw and EMA weights, next to the same on the true renders (the ceiling: all 1.000 at 32x32).
No run of 1500 steps tried here reaches a usable tokenizer for colour: count and position 0.94-1.00 (4x4-pixel
tokens), shape 0.04-0.17 and colour 0.00-0.10 (chance is 1/6) whatever the KL weight
(beta_end 6.6, 0.5, 0.1, 0), pixel noise, straight-through codes (--hard), a tau that stays at 0.5 or above, 64
codes, step sizes 1e-2 and 1e-3, tokens of 2x2 pixels (--group-count 2) or the squared error (--recon mse: one code,
stopped). Longer runs are what moved colour: 3000 steps read it right on 0.230 of the held-out scenes (MSE 0.0075,
shape 0.09), and 6000 steps (the default; 1138 s on one thread of the loaded machine) on all of them: count, colour
and position 1.000, shape 0.330, all 0.330 (EMA 0.335; 0.420 and 0.450 read with the refined shape fit of
data.read_objects), MSE 0.0028, 204 codes
(docs/dvae/recon_synthetic_32px_noise_6000steps.png). In the shorter runs the codes do differ between colours, but
every code decodes to the same grey-green: the decoder fits the per-channel median colour of all objects, and while
every code decodes to it the encoder gets little gradient to separate colours; the slower schedule of a longer run
(tau and the step size stay high for longer) lets the colours separate by step 1500 of 6000. The KL term is not the
cause (beta 0 did not help). --pixel-noise 1/64 is the default because the logit-Laplace likelihood of a flat black
background is unbounded as ln b -> -inf (with the noise 125 codes over 256 images against 42 and reconstruction MSE
0.0113 against 0.0120 at 1500 steps; check accuracy 0.02 against 0.00, within noise). Shape is what the small model
still misses.

Decoder steps (--decoder-steps N, not the paper's): after the --steps steps of the ELB, N steps train the decoder
alone on the argmax codes of the encoder (the reconstruction term of --recon, no relaxation, no KL term), the step
size cosine from --decoder-lr to 1/20 of it. The ELB trains the decoder on relaxed samples; a transformer is
trained on, and generates, argmax codes. At the first decoder step the model takes its EMA weights, so the
encoder (raw and averaged, which then stay equal bit for bit) tokenizes as the EMA model of step --steps did and
every code a transformer was trained on stays valid; the decoder's AdamW moments start afresh. Measured (README,
"Reconstruction quality"): 4000 decoder steps (~4 min on one thread) after the 8000-step model raised the shape
read back from its held-out reconstructions from 0.53 to 0.68 (crosses: 26 -> 35 of 89 read right).

Object weight (--object-weight W, not the paper's): the reconstruction term weighs the pixels within 2 of a
non-black one (OBJECT_MARGIN; max over channels above 0.1) W times the rest, in both phases (weighted mean per
subpixel). Most pixels are black background, so unweighted the codes carry little of an object's outline.
Measured (session 13, one thread per run, `--steps 12000 --decoder-steps 4000 --object-weight 8`, EMA check on
200 held-out scenes): seeds 1-4 read shape 0.915, 0.795, 0.920, 0.890 (unweighted seed 1: 0.750); seed 1 lost
colour (0.365), the others read colour, count and position 1.000, so all 0.920 (seed 3) and 0.890 (seed 4).

`load_dvae(path)` returns the trained DiscreteVAE (EMA weights by default) for train_dalle and sampling.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import training

FORMAT = "dalle_fast.dvae/1"
CHECKPOINT_NAME = "dvae.pt"
PAPER = {"tau_start": 1.0, "tau_end": 1 / 16, "beta_end": 6.6, "lr": 1e-4, "lr_end": 1.25e-6}
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}
PRESETS = {
    # the paper's model (pip package dall-e): 256x256 images -> 32x32 tokens over 8192 codes
    "openai": {"group_count": 4, "n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192, "n_init": 128},
    # the default: a small model that learns visibly in minutes on 2 CPU cores
    # 32x32 images -> 8x8 tokens of 4x4 pixels (group_count 3): see the module doc for why not 8x8 pixels
    "small": {"group_count": 3, "n_hid": 32, "n_blk_per_group": 1, "vocab_size": 512, "n_init": 64},
}
OBJECT_MARGIN = 2  # --object-weight's neighbourhood: pixels within this many of an object pixel
MODEL_KEYS = ("group_count", "n_hid", "n_blk_per_group", "vocab_size", "n_init", "channels")


# Model ---------------------------------------------------------------------------------------------------


def make_dvae(config: dict, device=None):
    """A fresh DiscreteVAE from a model config (MODEL_KEYS)."""
    from .nn import Decoder, DiscreteVAE, Encoder

    c = config
    enc = Encoder(c["group_count"], c["n_hid"], c["n_blk_per_group"], c["channels"], c["vocab_size"], device=device)
    dec = Decoder(c["group_count"], c["n_init"], c["n_hid"], c["n_blk_per_group"], c["channels"], c["vocab_size"],
                  device=device)  # fmt: skip
    return DiscreteVAE(enc, dec)


def load_dvae(path, *, ema: bool = True, map_location="cpu"):
    """The DiscreteVAE of a train_dvae checkpoint, in eval mode: its EMA weights (ema=True, the default, what
    the paper samples with) or the raw trained weights. The image size it was trained at is
    `model.image_size` (the token grid is image_size / 8 on each side)."""
    ckpt = training.load_checkpoint(path, map_location=map_location)
    if ckpt["format"] != FORMAT:
        raise ValueError(f"checkpoint: {os.fspath(path)!r} has format {ckpt['format']!r}, expected {FORMAT!r}")
    model = make_dvae(ckpt["config"], device=map_location if isinstance(map_location, (str, torch.device)) else None)
    model.load_state_dict(ckpt["model"])
    if ema:
        e = training.EMA(model)
        e.load_state_dict(ckpt["ema"])
        e.copy_to(model)
    model.image_size = int(ckpt["args"]["image_size"])
    return model.eval()


# Arguments -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dalle_fast.train_dvae", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    a = ap.add_argument
    a("--data", default="synthetic", help="'synthetic' (data.SyntheticShapes, train split) or an image folder")
    a("--image-size", type=int, default=32, help="square image side in pixels (a multiple of 8)")
    a("--synthetic-length", type=int, default=20000, help="number of synthetic training scenes")
    a("--steps", type=int, default=6000, help="total optimizer steps (the schedules' horizon)")
    a("--batch-size", type=int, default=16, help="images per step and per process")
    a("--preset", choices=sorted(PRESETS), default="small", help="model sizes (openai: the paper's)")
    for k in ("group_count", "n_hid", "n_blk_per_group", "vocab_size", "n_init"):
        a("--" + k.replace("_", "-"), type=int, default=None, help="override the preset's value")
    a("--lr", type=float, default=3e-3, help="peak step size (paper: 1e-4 for its 100x larger model)")
    a("--lr-end", type=float, default=None, help="final step size (default: lr / 80, the paper's ratio)")
    a("--lr-steps", type=int, default=None, help="step-size cosine horizon (default: --steps)")
    a("--weight-decay", type=float, default=1e-4)
    a("--tau-start", type=float, default=PAPER["tau_start"])
    a("--tau-end", type=float, default=PAPER["tau_end"])
    a("--tau-steps", type=int, default=None, help="temperature cosine horizon (default: --steps)")
    a("--beta-end", type=float, default=PAPER["beta_end"])
    a("--beta-steps", type=int, default=None, help="KL-weight cosine horizon (default: --steps / 10)")
    a("--recon", choices=("logit-laplace", "mse"), default="logit-laplace",
      help="reconstruction term: the paper's logit-Laplace NLL, or squared error of sigmoid(mu) (no ln b)")  # fmt: skip
    a("--decoder-steps", type=int, default=0,
      help="then this many steps training the decoder alone on the argmax codes of the fixed encoder")  # fmt: skip
    a("--decoder-lr", type=float, default=2e-3, help="peak step size of the decoder steps (cosine to 1/20 of it)")
    a("--object-weight", type=float, default=1.0,
      help=f"reconstruction weight within {OBJECT_MARGIN} pixels of a non-black one (1: the paper's)")  # fmt: skip
    a("--hard", action="store_true", help="straight-through Gumbel (one-hot codes forward; not the paper's)")
    a("--codebook-std", type=float, default=1.0,
      help="initial std of the decoder's codebook vectors (0: the official init, std 1/sqrt(vocab_size))")  # fmt: skip
    a("--pixel-noise", type=float, default=1 / 64,
      help="add U(0, this) to training pixels, clipped to [0, 1] (dequantization; 0: none, the paper's)")  # fmt: skip
    a("--ema-decay", type=float, default=0.999)
    a("--amp", choices=("auto", "on", "off"), default="auto", help="fp16 with loss scaling (auto: on CUDA)")
    a("--seed", type=int, default=0)
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--backend", default=None, help="dalle_fast.ops backend for the fused ops (default: automatic)")
    a("--out", default="runs/dvae", help="directory for checkpoints and reconstruction grids")
    a("--ckpt-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    a("--grid-every", type=int, default=500, help="reconstruction grid every N steps (and at the end); 0: end only")
    a("--grid-images", type=int, default=8, help="images in a reconstruction grid")
    a("--eval-images", type=int, default=256, help="images (the first of the data set) for the final usage figures")
    a("--check-images", type=int, default=200,
      help="synthetic: held-out scenes whose argmax reconstructions data.check reads at the end")  # fmt: skip
    a("--log-every", type=int, default=25, help="progress line every N steps when not on a terminal")
    a("--resume", default=None, help="checkpoint path, or 'auto' for OUT/dvae.pt when it exists")
    a("--stop-after", type=int, default=None, help="stop after N steps of this run (as an interruption would)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return ap


def _positive(args, name, allow_zero=False):
    v = getattr(args, name)
    if v is None:
        return
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"--{name.replace('_', '-')}: expected an integer {'>= 0' if allow_zero else '> 0'}, got {v}")


def check_args(args) -> dict:
    """Validate the arguments (clear errors naming the flag) and return the model config."""
    for name in ("steps", "batch_size", "synthetic_length", "grid_images", "log_every", "lr_steps", "tau_steps",
                 "beta_steps", "stop_after", "threads", "group_count", "n_hid", "n_blk_per_group", "vocab_size",
                 "n_init"):  # fmt: skip
        _positive(args, name)
    for name in ("ckpt_every", "grid_every", "eval_images", "check_images", "decoder_steps"):
        _positive(args, name, allow_zero=True)
    for name in ("lr", "tau_start", "tau_end", "decoder_lr", "object_weight"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')}: expected a finite number > 0, got {v}")
    for name in ("lr_end", "weight_decay", "beta_end", "codebook_std"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')}: expected a finite number >= 0, got {v}")
    if args.amp == "on" and (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
        raise ValueError("--amp on: fp16 loss scaling needs a CUDA device, and this run is on the CPU")
    if not (math.isfinite(args.pixel_noise) and 0 <= args.pixel_noise <= 1):
        raise ValueError(f"--pixel-noise: expected a number in [0, 1], got {args.pixel_noise}")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema-decay: expected a number in [0, 1), got {args.ema_decay}")
    config = dict(PRESETS[args.preset])
    for k in ("group_count", "n_hid", "n_blk_per_group", "vocab_size", "n_init"):
        if getattr(args, k) is not None:
            config[k] = getattr(args, k)
    config["channels"] = 3
    f = 2 ** (config["group_count"] - 1)
    if args.image_size < f or args.image_size % f:
        raise ValueError(
            f"--image-size: expected a positive multiple of {f} (the encoder halves the size "
            f"{config['group_count'] - 1} times), got {args.image_size}"
        )
    if args.data != "synthetic":
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f"--data: expected 'synthetic' or an existing image folder, got {args.data!r}")
    elif args.image_size < 24:
        raise ValueError(f"--image-size: the synthetic data set needs at least 24 pixels, got {args.image_size}")
    if args.resume is not None and args.resume != "auto" and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume: expected 'auto' or a checkpoint file, got {args.resume!r} (no such file)")
    return config


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}


# Schedules and statistics --------------------------------------------------------------------------------


def schedules(args, step: int) -> dict:
    """tau, beta and the step size of `step` (pure functions of the step). The decoder steps (step >= --steps)
    have only a step size: cosine from --decoder-lr to 1/20 of it."""
    if step >= args.steps:
        return {"lr": training.cosine(step - args.steps, args.decoder_steps, args.decoder_lr, args.decoder_lr / 20)}
    lr_end = args.lr * PAPER["lr_end"] / PAPER["lr"] if args.lr_end is None else args.lr_end
    return {
        "tau": training.cosine(step, args.tau_steps or args.steps, args.tau_start, args.tau_end),
        "beta": training.cosine(step, args.beta_steps or max(1, args.steps // 10), 0.0, args.beta_end),
        "lr": training.cosine(step, args.lr_steps or args.steps, args.lr, lr_end),
    }


def code_usage(logits: torch.Tensor) -> tuple[float, int]:
    """(perplexity of the histogram of the argmax codes, number of distinct codes) of a batch of logits."""
    codes = logits.detach().argmax(dim=1).flatten()
    counts = torch.bincount(codes, minlength=logits.shape[1]).double()
    p = counts[counts > 0] / codes.numel()
    return float(torch.exp(-(p * p.log()).sum())), int((counts > 0).sum())


@torch.no_grad()
def evaluate(model, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Codebook usage and reconstruction error over `images` as the paper tokenizes (argmax codes): the
    perplexity of the code histogram, the number of distinct codes, and the mean squared error (pixels in
    [0, 1]) of the reconstructions decoded from the argmax codes."""
    codes, se = [], 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        c = model.get_codebook_indices(x)
        codes.append(c.flatten())
        se += float(((model.decode(c).float() - x.float()) ** 2).sum())
    codes = torch.cat(codes)
    counts = torch.bincount(codes, minlength=model.vocab_size).double()
    p = counts[counts > 0] / codes.numel()
    return {"images": images.shape[0], "ppl": float(torch.exp(-(p * p.log()).sum())), "codes": int((counts > 0).sum()),
            "mse": se / images.numel()}  # fmt: skip


@torch.no_grad()
def check_accuracy(model, images: torch.Tensor, scenes, batch_size: int = 64) -> dict:
    """How often data.check reads the scene back from the argmax reconstructions of `images` (and, as the
    ceiling, from the images themselves): {"recon": {attribute: fraction}, "true": {...}} over count, shape,
    colour, position and all."""
    from . import data

    keys = ("count", "shape", "colour", "position", "all")
    tally = {"recon": dict.fromkeys(keys, 0), "true": dict.fromkeys(keys, 0)}
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        recon = model.decode(model.get_codebook_indices(x)).float().cpu()
        for j in range(x.shape[0]):
            for kind, img in (("recon", recon[j]), ("true", x[j].float().cpu())):
                for k, ok in data.check(img, scenes[i + j]).items():
                    tally[kind][k] += bool(ok)
    n = max(1, images.shape[0])
    return {kind: {k: v / n for k, v in t.items()} for kind, t in tally.items()}


def check_set(args, n: int):
    """The first n held-out scenes (SyntheticShapes "test" split: colour/shape combinations the training split
    lacks) at the training image size: (images [n, 3, S, S], scenes)."""
    return scene_set("test", n, args.image_size, args.seed)


def scene_set(split: str, n: int, image_size: int, seed: int):
    """The first n scenes of SyntheticShapes(split, seed=seed) rendered at image_size: (images [n, 3, S, S],
    scenes), what check_accuracy reads."""
    from . import data

    ds = data.SyntheticShapes(split, n, image_size, seed=seed)
    return torch.stack([ds[i][0] for i in range(n)]), [ds.scene(i) for i in range(n)]


def pixel_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor | None:
    """[B, 1, H, W] weights of the reconstruction term: `object_weight` for the pixels within OBJECT_MARGIN
    pixels (a square neighbourhood) of a non-black one (max over channels above 0.1), 1 elsewhere; None when
    object_weight is 1 (the paper's unweighted mean)."""
    if object_weight == 1:
        return None
    m = OBJECT_MARGIN
    near = F.max_pool2d((x.float().amax(1, keepdim=True) > 0.1).float(), 2 * m + 1, stride=1, padding=m)
    return 1 + (object_weight - 1) * near


def recon_term(stats: torch.Tensor, x: torch.Tensor, recon: str, weights: torch.Tensor | None = None):
    """The reconstruction term of decoder statistics `stats` [B, 2C, H, W] for images x in [0, 1]: the
    logit-Laplace NLL ("logit-laplace", the paper's) or the squared error between sigmoid(mu) and the mapped
    pixels ("mse"), per subpixel: the mean, or with `weights` ([B, 1, H, W], pixel_weights) the weighted mean."""
    from . import ops
    from .nn.dvae import map_pixels

    c = x.shape[1]
    target = map_pixels(x.float())
    if recon == "mse":
        per = (torch.sigmoid(stats[:, :c]) - target) ** 2
    else:
        reduction = "mean" if weights is None else "none"
        per = ops.logit_laplace_nll(target, stats[:, :c], stats[:, c:], reduction=reduction)
    if weights is None:
        return per.mean()
    return (per * weights).sum() / (weights.sum() * c)


def objective(out, x: torch.Tensor, recon: str, beta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss to minimise: DiscreteVAE.forward's (recon "logit-laplace" unweighted, the paper's) or the
    reconstruction term of `recon` and `weights` (recon_term) plus the same beta-weighted KL term."""
    if recon == "logit-laplace" and weights is None:
        return out.loss
    ratio = (out.logits.shape[2] * out.logits.shape[3]) / (x.shape[1] * x.shape[2] * x.shape[3])
    return recon_term(out.stats, x, recon, weights) + beta * ratio * out.kl


def decoder_objective(model, x: torch.Tensor, recon: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a decoder step: the reconstruction term (recon_term) of the images decoded from their
    argmax codes, the encoder's (no gradient reaches it): the codes a transformer is trained on and
    generates, where the ELB's steps decode relaxed samples."""
    return recon_term(model.decode_stats(model.get_codebook_indices(x)), x, recon, weights)


def average_gradients(params, world: int) -> None:
    """All-reduce the gradients of `params` to their mean over ranks (the decoder steps do not run through DDP)."""
    if world > 1:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)


def add_pixel_noise(x: torch.Tensor, amount: float, seed: int) -> torch.Tensor:
    """x + U(0, amount) per subpixel, clipped to [0, 1]; the noise is a pure function of `seed` (exact resume)."""
    if amount <= 0:
        return x
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return (x + amount * noise).clamp_(0, 1)


# Data ----------------------------------------------------------------------------------------------------


def make_dataset(args):
    from . import data

    if args.data == "synthetic":
        return data.SyntheticShapes("train", args.synthetic_length, args.image_size, seed=args.seed)
    return data.ImageFolder(args.data, args.image_size, seed=args.seed)


def fetch(dataset, indices, epoch: int) -> torch.Tensor:
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    items = [dataset[i] for i in indices]
    return torch.stack([it[0] if isinstance(it, tuple) else it for it in items])


# Pictures ------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, *, scale: int = 2, gap: int = 2) -> torch.Tensor:
    """uint8 [H, W, 3]: the images (top row) over their reconstructions from the argmax codes (bottom row),
    each enlarged `scale` times (nearest), separated by `gap` grey pixels."""
    recon = model.decode(model.get_codebook_indices(images)).float().cpu()
    rows = [images.float().cpu().clamp(0, 1), recon]
    n, _, s, _ = images.shape
    s2 = s * scale
    pic = torch.full((3, 2 * s2 + 3 * gap, n * s2 + (n + 1) * gap), 0.5)
    for r, imgs in enumerate(rows):
        big = F.interpolate(imgs, scale_factor=scale, mode="nearest")
        for i in range(n):
            y, x = gap + r * (s2 + gap), gap + i * (s2 + gap)
            pic[:, y : y + s2, x : x + s2] = big[i]
    return (pic * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def save_grid(path, model, images) -> None:
    from .masks import write_png

    write_png(path, reconstruction_grid(model, images))


# Training ------------------------------------------------------------------------------------------------


def checkpoint_state(args, config, step, model, optimizer, ema, scaler) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "config": dict(config),
        "args": _plain_args(args),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": training.rng_state(),
    }


def train(args, *, stream=None) -> dict:
    """Run training as `args` say (build_parser's namespace). Returns {"step": the last step done, "history":
    per-step dicts of rank 0's batch (loss, nll, kl, ppl, codes, tau, beta, lr; empty on other ranks), "out",
    "model": the trained module (raw weights), "eval": evaluate()'s figures on rank 0 (None elsewhere, with
    --eval-images 0, or when a resumed run had nothing left to do)}."""
    from . import ops
    from .nn.dvae import DVAEOutput  # noqa: F401  (documents what forward returns)

    config = check_args(args)
    threads = torch.get_num_threads()  # --threads holds for this run only; restored for the caller below
    dist = training.Dist(args.device)
    stream = stream if stream is not None else sys.stderr
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = dist.device
        use_amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
        if use_amp and device.type != "cuda":
            raise ValueError("--amp on: fp16 loss scaling needs a CUDA device")
        dataset = make_dataset(args)
        sampler = training.StepSampler(len(dataset), args.batch_size, seed=args.seed, rank=dist.rank,
                                       world_size=dist.world)  # fmt: skip
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = make_dvae(config, device=device)
        if args.codebook_std > 0:
            with torch.no_grad():
                model.decoder.codebook.w.normal_(0.0, args.codebook_std)
        if not use_amp:
            for m in model.modules():  # fp32 throughout when loss scaling is off (CPU, or --amp off on CUDA)
                if hasattr(m, "use_float16"):
                    m.use_float16 = False
        # NHWC: a CPU training step of the default model runs ~1.2x faster with it (oneDNN's convolutions; README,
        # "Training the dVAE"); cuDNN's fp16 convolutions prefer it too
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, **ADAMW)
        ema = training.EMA(model, args.ema_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
        start = 0
        resume = args.resume
        ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
        if resume == "auto":
            resume = ckpt_path if os.path.isfile(ckpt_path) else None
        if resume is not None:
            ckpt = training.load_checkpoint(resume, map_location=device)
            if ckpt["format"] != FORMAT:
                raise ValueError(f"--resume: {resume!r} has format {ckpt['format']!r}, expected {FORMAT!r}")
            if ckpt["config"] != config:
                raise ValueError(f"--resume: the checkpoint's model {ckpt['config']} differs from {config}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            ema.load_state_dict(ckpt["ema"])
            scaler.load_state_dict(ckpt["scaler"])
            training.set_rng_state(ckpt["rng"])
            start = int(ckpt["step"])
        net = model
        if dist.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)  # fmt: skip
        grid_images = fetch(dataset, list(range(min(args.grid_images, len(dataset)))), 0).to(device)
        if dist.is_main:
            os.makedirs(args.out, exist_ok=True)
        total = args.steps + args.decoder_steps
        end = total if args.stop_after is None else min(total, start + args.stop_after)
        progress = training.Progress(total, every=args.log_every, stream=stream, enabled=dist.is_main,
                                     prefix="dvae ", start=start)  # fmt: skip
        history = []

        def save(step_done: int) -> None:
            if dist.is_main:
                training.atomic_save(checkpoint_state(args, config, step_done, model, optimizer, ema, scaler),
                                     ckpt_path)  # fmt: skip

        with ops.use_backend(args.backend):
            for step in range(start, end):
                s = schedules(args, step)
                for g in optimizer.param_groups:
                    g["lr"] = s["lr"]
                x = fetch(dataset, sampler.indices(step), int(sampler.epoch(step))).to(device, non_blocking=True)
                seed = training.step_seed(args.seed, step, dist.rank)
                x = add_pixel_noise(x, args.pixel_noise, seed ^ 0x5A5A5A5A).contiguous(
                    memory_format=torch.channels_last
                )
                optimizer.zero_grad(set_to_none=True)
                if step < args.steps:  # the ELB
                    out = net(x, tau=s["tau"], beta=s["beta"], seed=seed, hard=args.hard)
                    loss = objective(out, x, args.recon, s["beta"], pixel_weights(x, args.object_weight))
                    scaler.scale(loss).backward()
                else:  # a decoder step: the encoder (and so every code) stays as the EMA had it at --steps
                    if step == args.steps:
                        ema.copy_to(model)  # EMA updates of the encoder are then exact no-ops (lerp of equals)
                        for p in model.decoder.parameters():  # AdamW's moments start afresh for the new loss
                            optimizer.state.pop(p, None)
                    loss = decoder_objective(model, x, args.recon, pixel_weights(x, args.object_weight))
                    scaler.scale(loss).backward()
                    average_gradients(model.decoder.parameters(), dist.world)
                scaler.step(optimizer)
                scaler.update()
                ema.update(model)
                done = step + 1
                if dist.is_main and step < args.steps:  # rank 0's batch
                    ppl, n_codes = code_usage(out.logits)
                    rec = {"step": done, "loss": float(loss.detach()), "nll": float(out.recon_nll.detach()),
                           "kl": float(out.kl.detach()),
                           "ppl": ppl, "codes": n_codes, **s}  # fmt: skip
                    history.append(rec)
                    progress.update(step, loss=rec["loss"], nll=rec["nll"], kl=rec["kl"], tau=s["tau"],
                                    beta=s["beta"], ppl=ppl, codes=n_codes)  # fmt: skip
                elif dist.is_main:
                    rec = {"step": done, "loss": float(loss.detach()), "decoder": True, **s}
                    history.append(rec)
                    progress.update(step, decoder_loss=rec["loss"], lr=s["lr"])
                if args.grid_every and done % args.grid_every == 0 and done != end and dist.is_main:
                    save_grid(os.path.join(args.out, f"recon_{done:06d}.png"), model, grid_images)
                if args.ckpt_every and done % args.ckpt_every == 0 and done != end:
                    save(done)
        final = None
        if end > start or resume is None:
            save(end)
            if dist.is_main:
                save_grid(os.path.join(args.out, f"recon_{end:06d}.png"), model, grid_images)
                if args.eval_images:
                    n = min(args.eval_images, len(dataset))
                    final = evaluate(model, fetch(dataset, list(range(n)), 0).to(device))
                if args.check_images and args.data == "synthetic":
                    images, scenes = check_set(args, args.check_images)
                    final = dict(final or {}, check=check_accuracy(model, images.to(device), scenes))
                    final["check_ema"] = check_accuracy(ema.averaged(model), images.to(device), scenes)["recon"]
        dist.barrier()
        return {"step": end, "history": history, "out": args.out, "model": model, "eval": final}
    finally:
        dist.close()
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_dvae: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        h, e = (result["history"][-1] if result["history"] else None), result["eval"]
        print(f"train_dvae: {result['step']} steps in {time.perf_counter() - t0:.1f} s; checkpoint "
              f"{os.path.join(args.out, CHECKPOINT_NAME)}")  # fmt: skip
        if h and h.get("decoder"):
            print(f"train_dvae: last batch (a decoder step): recon nll of the argmax codes {h['loss']:.4f}")
        elif h:
            print(f"train_dvae: last batch: recon nll {h['nll']:.4f}, kl {h['kl']:.3f}, code perplexity "
                  f"{h['ppl']:.1f}, {h['codes']} distinct codes")  # fmt: skip
        if e and "check" in e:
            for kind, what in (("recon", "argmax reconstructions"), ("true", "true images (ceiling)")):
                c = e["check"][kind]
                print(f"train_dvae: data.check on {args.check_images} held-out scenes, {what}: all {c['all']:.3f} "
                      f"(count {c['count']:.3f}, shape {c['shape']:.3f}, colour {c['colour']:.3f}, "
                      f"position {c['position']:.3f})")  # fmt: skip
            c = e["check_ema"]
            print(f"train_dvae: the same with the EMA weights (what load_dvae returns): all {c['all']:.3f} "
                  f"(count {c['count']:.3f}, shape {c['shape']:.3f}, colour {c['colour']:.3f}, "
                  f"position {c['position']:.3f})")  # fmt: skip
        if e and "images" in e:
            print(f"train_dvae: argmax codes of the first {e['images']} images: perplexity {e['ppl']:.1f}, "
                  f"{e['codes']} distinct codes of {result['model'].vocab_size}; reconstruction mse "
                  f"{e['mse']:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
