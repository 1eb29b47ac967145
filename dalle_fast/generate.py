"""Generate images from captions with a trained DALL-E checkpoint and its dVAE.

    python -m dalle_fast.generate "a red circle above a blue square" --checkpoint runs/dalle/last.pt \\
        --out samples.png [--num-samples 8] [--top-k 32] [--top-p 0.95] [--temperature 1] [--seed 0] [--rerank]
        [--guidance-scale 2]

The checkpoint is the one dalle_fast.train_dalle writes (self-contained: config, tokenizer, weights); the dVAE
that decodes the codes is --dvae, by default the one that training recorded. Writes a grid (one row per
caption, num_samples images per row, best first with --rerank) and prints where it went.

--rerank (or --rerank likelihood) orders each caption's samples by log p(image | caption); --rerank contrastive
by that against the empty caption and, for captions of the synthetic shapes grammar, the captions one word away
(nn.decoding.contrastive_scorer). --guidance-scale s > 1 samples with classifier-free guidance (a model trained
with train_dalle --text-dropout).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch


def load_models(checkpoint, dvae=None, *, device="cpu", ema: bool = True):
    """(DALLE, TextTokenizer, DiscreteVAE) from a train_dalle checkpoint and (optionally) a dVAE checkpoint."""
    from .train_dalle import load_dalle
    from .train_dvae import load_dvae
    from .training import load_checkpoint

    model, tokenizer = load_dalle(checkpoint, ema=ema, device=device)
    if dvae is None:
        dvae = load_checkpoint(checkpoint).get("args", {}).get("dvae")
        if not dvae:
            raise ValueError(f"--dvae: the checkpoint {checkpoint!r} does not record its dVAE: pass --dvae PATH")
    return model, tokenizer, load_dvae(dvae, map_location=device)


def encode_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [N, T] for captions, refusing captions longer than the model's text length (no silent cut)."""
    for cap in captions:
        n = len(tokenizer.tokenize(cap))
        if n > tokenizer.text_len:
            raise ValueError(f"caption: {cap!r} is {n} tokens long; the model reads at most {tokenizer.text_len}")
    return tokenizer.encode(captions)


def _scorer(kind: str, model, tokenizer, caption: str):
    """None (rerank's likelihood) or the contrastive scorer against the empty caption and, for a caption of the
    synthetic shapes grammar, its one-word variants."""
    if kind == "likelihood":
        return None
    from . import data
    from .nn.decoding import contrastive_scorer, null_text

    negatives = null_text(model)
    try:
        variants = data.caption_variants(caption)
    except ValueError:  # not the synthetic grammar: the empty caption alone
        variants = []
    if variants:
        negatives = torch.cat([tokenizer.encode(variants).to(negatives.device), negatives])
    return contrastive_scorer(model, negatives)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dalle_fast.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("captions", nargs="+", help="one or more captions")
    ap.add_argument("--checkpoint", required=True, help="a dalle_fast.train_dalle checkpoint")
    ap.add_argument("--dvae", help="the dVAE checkpoint (default: the one the DALL-E checkpoint names)")
    ap.add_argument("--out", default="samples.png", help="PNG grid to write")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rerank",
        nargs="?",
        const="likelihood",
        choices=("likelihood", "contrastive"),
        help="order each caption's samples, best first (alone: by the model's likelihood)",
    )
    ap.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance (1: off; needs a model trained with --text-dropout)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their moving average")
    args = ap.parse_args(argv)
    if args.num_samples < 1:
        ap.error(f"--num-samples: expected an integer >= 1, got {args.num_samples}")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        ap.error(f"--guidance-scale: expected a finite number >= 0 (1: off), got {args.guidance_scale}")
    from .data import image_grid, write_png
    from .nn.decoding import rerank

    model, tokenizer, dvae = load_models(args.checkpoint, args.dvae, device=args.device, ema=not args.no_ema)
    try:
        text = encode_captions(tokenizer, args.captions).to(args.device)
    except ValueError as e:
        ap.error(str(e))
    t0 = time.perf_counter()
    codes = model.generate(text, num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, guidance_scale=args.guidance_scale,
                           progress=sys.stderr.isatty())  # fmt: skip
    seconds = time.perf_counter() - t0
    if args.rerank:
        codes = torch.stack([rerank(model, t, c, scorer=_scorer(args.rerank, model, tokenizer, cap))[0]
                             for cap, t, c in zip(args.captions, text, codes)])  # fmt: skip
    images = dvae.decode(codes.flatten(0, 1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_png(args.out, image_grid(images, ncol=args.num_samples))
    n = codes.shape[0] * codes.shape[1]
    print(f"wrote {args.out}: {len(args.captions)} caption(s) x {args.num_samples} samples "
          f"({n / seconds:.2f} images/s on {args.device})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
