"""Train the DALL-E transformer: `python -m dalle_fast.train_dalle --dvae DVAE.pt` (issue 6, section 2).

Data. Captions of the synthetic shapes data set (dalle_fast.data.SyntheticShapes, split "train") and the image
tokens a trained dVAE gives their images (argmax of the encoder logits, as the paper tokenizes). The codes are
computed once and cached on disk (--cache-dir), in a file keyed by the dVAE checkpoint's SHA-256, the data set's
parameters and the image size: a later run with the same dVAE and data reads them back instead of re-encoding.

Text. A byte-level BPE (dalle_fast.text.TextTokenizer) trained on the training captions; during training each
caption is encoded with BPE dropout (paper: 10%). The tokenizers library's own dropout cannot be seeded, so the
training encoder here (SeededBPEDropout) applies the tokenizer's merges itself with the library's procedure and
a random generator seeded from (seed, step, rank): a resumed run sees the very token ids an uninterrupted one
would have (with dropout 0 it gives exactly the library's encoding; tested).

Model. DALLEConfig.tiny() sized to the data: text_len (--text-len), the tokenizer's text vocabulary, the dVAE's
token grid and vocabulary; --layers / --heads / --head-dim override the sizes. --dtype auto is float16 resblocks
with the per-resblock gradient scaler (dalle_fast.amp.PerResblockGradScaler, DESIGN section 6) on CUDA and
float32 on CPU; float16 always comes with the scaler, bfloat16 and float32 never.

Optimisation (paper section 2.4, App. B.2). AdamW with beta1 0.9, beta2 0.96, eps 1e-8, weight decay 4.5e-2 on
the matrices of the resblocks and the output head (not on gains, biases or embeddings); gradient-norm clipping at
4 (after unscaling); a linear warm-up then a cosine decay of the step size (training.warmup_cosine); an EMA of
the weights (training.EMA), which load_dalle returns by default.

Checkpoints (training.atomic_save, weights_only-loadable, self-contained): {"format": "dalle_fast.dalle/1",
"config", "tokenizer" (TextTokenizer JSON), "model", "optimizer", "ema", "scaler" (or None), "compute_dtype",
"step", "rng", "args", "data"}. `--resume` continues from the checkpoint exactly: the batch of a step, its BPE
dropout and the step size are functions of the step, and everything that changes is in the file, so a run
interrupted and resumed makes bit-identical updates to an uninterrupted one (CPU, float32; tested).

Distributed. Under torchrun every rank takes its slice of each global batch (training.StepSampler) and the model
is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU). `--powersgd-rank R` registers torch's PowerSGD
communication hook (torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook) with matrix rank R, after
--powersgd-start plain all-reduce steps. The hook's state (error feedback, warm-start factors) is not saved in
checkpoints: a resumed PowerSGD run starts that state afresh (resume is exact without PowerSGD). With the
per-resblock scaler the blocks' non-finite flags are OR-ed over ranks before the step, so every rank skips or
applies the same updates.

    python -m dalle_fast.train_dvae ... --out dvae.pt
    python -m dalle_fast.train_dalle --dvae dvae.pt --out dalle.pt
    torchrun --nproc_per_node 2 -m dalle_fast.train_dalle --dvae dvae.pt --out dalle.pt --powersgd-rank 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import data, training
from .amp import PerResblockGradScaler
from .nn import DALLE, DALLEConfig
from .nn.dvae import DiscreteVAE
from .text import TextTokenizer

FORMAT = "dalle_fast.dalle/1"
DVAE_FORMAT = "dalle_fast.dvae/1"
CODES_FORMAT = "dalle_fast.codes/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# dVAE checkpoints and cached codes -----------------------------------------------------------------------


def read_dvae(path, *, ema: bool = True, device="cpu") -> DiscreteVAE:
    """The DiscreteVAE of a train_dvae checkpoint on `device`, in eval mode, with its EMA weights by default
    (dalle_fast.train_dvae.load_dvae); the image size it was trained at is `model.image_size`."""
    from .train_dvae import load_dvae

    return load_dvae(path, ema=ema, map_location=device).to(device).eval()


def _dvae_checkpoint(path) -> dict:
    ckpt = training.load_checkpoint(path)
    if ckpt["format"] != DVAE_FORMAT:
        raise ValueError(f"dvae: expected a {DVAE_FORMAT!r} checkpoint, got format {ckpt['format']!r} in {path!r}")
    return ckpt


def dvae_image_size(path) -> int | None:
    """The image size a dVAE checkpoint was trained at (its args), or None when it does not say."""
    size = (_dvae_checkpoint(path).get("args") or {}).get("image_size")
    return None if size is None else int(size)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: data.SyntheticShapes,
    *,
    batch_size: int = 64,
    device="cpu",
    log=None,
) -> torch.Tensor:
    """int64 codes [N, h, w] of every image of `dataset`: encode(images [B, 3, S, S] in [0, 1]) -> codes [B, h, w]
    (e.g. DiscreteVAE.get_codebook_indices)."""
    out = []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        images = torch.stack([data.render(dataset.scene(i), dataset.image_size) for i in idx]).to(device)
        codes = encode(images)
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[0] != len(idx):
            raise ValueError(f"encode: expected codes [{len(idx)}, h, w] for a batch of images, got {_describe(codes)}")
        out.append(codes.long().cpu())
        if log is not None and (start // batch_size) % 20 == 0:
            log(f"encoding images {start + len(idx)}/{len(dataset)}")
    return torch.cat(out)


def cached_codes(dvae_path, dataset: data.SyntheticShapes, cache_dir, *, device="cpu", ema=True, log=None):
    """(codes int64 [N, h, w], vocab_size, cache file): the dVAE's codes of `dataset`, from the cache file keyed by
    the dVAE checkpoint's SHA-256, the data set's parameters and the image size, or computed and written there."""
    digest = file_sha256(dvae_path)
    key = {"dvae_sha256": digest, "ema": bool(ema), "split": dataset.split, "length": len(dataset),
           "image_size": dataset.image_size, "seed": dataset.seed, "max_objects": dataset.max_objects}  # fmt: skip
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(os.fspath(cache_dir), f"codes-{name}.pt")
    if os.path.isfile(path):
        ckpt = training.load_checkpoint(path)
        if ckpt["format"] == CODES_FORMAT and ckpt["key"] == key:
            return ckpt["codes"].long(), int(ckpt["vocab_size"]), path
    dvae = read_dvae(dvae_path, ema=ema, device=device)
    codes = encode_images(dvae.get_codebook_indices, dataset, device=device, log=log)
    small = codes.to(torch.int16 if dvae.vocab_size <= 2**15 else torch.int32)
    training.atomic_save({"format": CODES_FORMAT, "key": key, "vocab_size": dvae.vocab_size, "codes": small}, path)
    return codes, dvae.vocab_size, path


# Seeded BPE dropout --------------------------------------------------------------------------------------


class SeededBPEDropout:
    """Encode captions like tokenizer.encode(..., train=True), with BPE dropout drawn from a given
    random.Random instead of the tokenizers library's unseedable generator.

    The library's procedure (tokenizers' Word::merge_all): the applicable merges of a word wait in a queue by
    rank (then position); the best is taken and, with probability `dropout`, set aside instead of applied; the
    merges set aside return to the queue after the next applied merge; the word is done when the queue is
    empty. Normalisation and pre-tokenisation are the tokenizer's own (the library does them)."""

    def __init__(self, tokenizer: TextTokenizer, dropout: float | None = None):
        tk = __import__("tokenizers")
        js = json.loads(tokenizer.to_json())
        self.tokenizer = tokenizer
        self.dropout = tokenizer.dropout if dropout is None else float(dropout)
        self._tk = tk.Tokenizer.from_str(js["tokenizer"])
        model = json.loads(js["tokenizer"])["model"]
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
            raise ValueError("tokenizer: SeededBPEDropout handles plain byte-level BPE models only")
        self.vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}

    def _word(self, piece: str, rng: random.Random | None) -> list[int]:
        if rng is None and piece in self._cache:
            return self._cache[piece]
        symbols = list(piece)
        p = self.dropout if rng is not None else 0.0
        while len(symbols) > 1:
            queue = sorted(
                (self.ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in self.ranks
            )
            for _, i in queue:
                if p > 0 and rng.random() < p:
                    continue  # set aside; back in the queue after the next applied merge
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                break
            else:
                break
        ids = [self.vocab[s] for s in symbols]
        if rng is None:
            self._cache[piece] = ids
        return ids

    def tokenize(self, caption: str, rng: random.Random | None = None) -> list[int]:
        """BPE ids of one caption, untruncated; rng None: no dropout."""
        if not isinstance(caption, str):
            raise TypeError(f"caption: expected a str, got {type(caption).__name__}")
        text = self._tk.normalizer.normalize_str(caption)
        ids = []
        for piece, _ in self._tk.pre_tokenizer.pre_tokenize_str(text):
            ids.extend(self._word(piece, rng))
        return ids

    def encode(self, captions: Sequence[str], rng: random.Random | None = None) -> torch.Tensor:
        """int64 [B, text_len]: truncated BPE ids, then the pads of the remaining positions (as TextTokenizer)."""
        tok = self.tokenizer
        out = tok.pad_ids().repeat(len(captions), 1)
        for i, c in enumerate(captions):
            ids = self.tokenize(c, rng)[: tok.text_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out


# Model and optimizer -------------------------------------------------------------------------------------


def drop_captions(text: torch.Tensor, pads: torch.Tensor, p: float, rng: random.Random) -> torch.Tensor:
    """text [B, T] with each caption replaced, with probability p drawn from rng, by the empty caption `pads`
    [T]: the model then also learns p(image) without a caption, which classifier-free guidance needs
    (DALLE.generate(guidance_scale=...))."""
    keep = torch.tensor([rng.random() >= p for _ in range(text.shape[0])], device=text.device)
    return torch.where(keep[:, None], text, pads)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the matrices of linear layers (resblock projections, the output head), none on
    gains, biases and embeddings (paper App. B.2)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def build_model(config: DALLEConfig, compute_dtype, *, device, backend=None, checkpoint=False, replicas=1):
    """(DALLE, scaler or None): float16 resblocks come with a PerResblockGradScaler (replicas = DDP world)."""
    scaler = None
    if compute_dtype == torch.float16:
        scaler = PerResblockGradScaler(2 * config.n_layers, replicas=replicas, device=device)
    model = DALLE(config, compute_dtype=compute_dtype, scaler=scaler, backend=backend, checkpoint=checkpoint,
                  device=device)  # fmt: skip
    return model, scaler


def load_dalle(path, *, ema: bool = True, device="cpu", compute_dtype=torch.float32, backend=None):
    """(DALLE, TextTokenizer) from a train_dalle checkpoint, in eval mode: the EMA weights by default (ema=False:
    the raw weights). compute_dtype: the resblocks' dtype for inference (float32 default; float16 runs without
    a gradient scaler, which inference does not need)."""
    ckpt = training.load_checkpoint(path)
    if ckpt["format"] != FORMAT:
        raise ValueError(f"path: expected a {FORMAT!r} checkpoint, got format {ckpt['format']!r} in {path!r}")
    config = DALLEConfig.from_dict(ckpt["config"])
    if isinstance(compute_dtype, str):
        compute_dtype = _DTYPES.get(compute_dtype, compute_dtype)
    model = DALLE(config, compute_dtype=compute_dtype, backend=backend, device=device)
    model.load_state_dict(ckpt["model"])
    if ema and ckpt.get("ema") is not None:
        shadow = ckpt["ema"]["shadow"]
        model.load_state_dict({k: shadow[k].to(v.dtype) if k in shadow else v for k, v in model.state_dict().items()})
    return model.eval(), TextTokenizer.from_json(ckpt["tokenizer"])


# Command line --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dalle_fast.train_dalle", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    a = p.add_argument
    a("--dvae", required=True, help="trained dVAE checkpoint (python -m dalle_fast.train_dvae)")
    a("--out", default="dalle.pt", help="checkpoint file written every --save-every steps and at the end")
    a("--resume", nargs="?", const="", default=None, metavar="CKPT",
      help="continue exactly from CKPT (default: --out)")  # fmt: skip
    a("--cache-dir", default=None, help="where the dVAE codes are cached (default: ~/.cache/dalle_fast/codes)")
    g = p.add_argument_group("data")
    g.add_argument("--data-length", type=int, default=10000, help="training scenes (SyntheticShapes, split train)")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--image-size", type=int, default=None,
                   help="pixels (default: the dVAE's training size); the token grid is image_size / 8")  # fmt: skip
    g.add_argument("--text-len", type=int, default=16)
    g.add_argument("--text-vocab", type=int, default=512, help="BPE vocabulary bound (pads follow it)")
    g.add_argument("--bpe-dropout", type=float, default=0.1)
    g.add_argument("--text-dropout", type=float, default=0.0,
                   help="probability of the empty caption (all pads) in place of a caption: for guidance")  # fmt: skip
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--backend", default="auto", help="ops backend: auto, cpp, cuda, triton or eager")
    g.add_argument("--dtype", default="auto", choices=("auto", *_DTYPES), help="resblock compute dtype")
    g.add_argument("--checkpointing", action="store_true", help="recompute each resblock in backward")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=32, help="per rank")
    g.add_argument("--lr", type=float, default=1e-3, help="peak step size")
    g.add_argument("--final-lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=4.5e-2)
    g.add_argument("--clip", type=float, default=4.0, help="gradient-norm clipping")
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop (and save) after this many steps, keeping the schedule of --steps")  # fmt: skip
    g = p.add_argument_group("distributed (torchrun)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--powersgd-rank", type=int, default=0, help="register PowerSGD with this rank (0: off)")
    g.add_argument("--powersgd-start", type=int, default=10, help="plain all-reduce steps before PowerSGD")
    g = p.add_argument_group("output")
    g.add_argument("--save-every", type=int, default=250)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--quiet", action="store_true")
    return p


def check_args(args) -> None:
    def need(name, ok, what):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')}: expected {what}, got {getattr(args, name)!r}")

    for name in ("data_length", "text_len", "layers", "heads", "head_dim", "steps", "batch_size", "save_every",
                 "log_every"):  # fmt: skip
        need(name, getattr(args, name) >= 1, "an integer >= 1")
    need("text_len", args.text_len >= 2, "an integer >= 2")
    need("image_size", args.image_size is None or args.image_size >= 24, "an integer >= 24 (SyntheticShapes)")
    need("text_vocab", args.text_vocab >= 256, "an integer >= 256 (the byte alphabet)")
    need("bpe_dropout", 0 <= args.bpe_dropout < 1, "a probability in [0, 1)")
    need("text_dropout", 0 <= args.text_dropout < 1, "a probability in [0, 1)")
    need("warmup", 0 <= args.warmup, "an integer >= 0")
    for name in ("lr", "clip"):
        need(name, math.isfinite(getattr(args, name)) and getattr(args, name) > 0, "a finite number > 0")
    for name in ("final_lr", "weight_decay"):
        need(name, math.isfinite(getattr(args, name)) and getattr(args, name) >= 0, "a finite number >= 0")
    need("ema_decay", 0 <= args.ema_decay < 1, "a number in [0, 1)")
    need("powersgd_rank", args.powersgd_rank >= 0, "an integer >= 0 (0: PowerSGD off)")
    need("powersgd_start", args.powersgd_start >= 2, "an integer >= 2 (torch's PowerSGD with error feedback)")
    need("stop_at", args.stop_at is None or 1 <= args.stop_at <= args.steps, f"an integer in [1, --steps={args.steps}]")
    if not os.path.isfile(args.dvae):
        raise FileNotFoundError(f"--dvae: no dVAE checkpoint at {args.dvae!r} (train one with dalle_fast.train_dvae)")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dalle_fast", "codes")


def _log(dd, quiet):
    def log(msg):
        if dd.is_main and not quiet:
            print(f"train_dalle: {msg}", file=sys.stderr, flush=True)

    return log


def train(args) -> dict:
    """Run the training the parsed arguments describe. Returns {"steps", "start", "history": [(step, loss, text loss,
    image loss) at each logged step, means over ranks], "skipped" (steps the scaler skipped), "out", "config", "cache"
    (the codes file), "model" (this rank's DALLE, raw weights), "tokenizer"}."""
    check_args(args)
    dd = training.Dist(args.device)
    try:
        return _train(args, dd)
    finally:
        dd.close()


def _train(args, dd: training.Dist) -> dict:
    log = _log(dd, args.quiet)
    device = dd.device
    resume_path = None
    if args.resume is not None:
        resume_path = args.resume or args.out
        if not os.path.isfile(resume_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {resume_path!r}")

    ckpt = training.load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None and ckpt["format"] != FORMAT:
        raise ValueError(f"--resume: expected a {FORMAT!r} checkpoint, got format {ckpt['format']!r}")

    # data: codes (cached), captions
    image_size = args.image_size or (ckpt["data"]["image_size"] if ckpt is not None else dvae_image_size(args.dvae))
    if image_size is None:
        raise ValueError(f"--image-size: the dVAE checkpoint {args.dvae!r} does not record its image size: give it")
    dataset = data.SyntheticShapes("train", args.data_length, image_size, seed=args.data_seed)
    cache_dir = args.cache_dir or _default_cache_dir()
    if dd.is_main:  # one rank encodes and writes the cache; the others read it
        codes, vocab, cache_file = cached_codes(args.dvae, dataset, cache_dir, device=device, log=log)
    dd.barrier()
    if not dd.is_main:
        codes, vocab, cache_file = cached_codes(args.dvae, dataset, cache_dir, device=device, log=log)
    captions = [dataset.scene(i).caption for i in range(len(dataset))]
    grid_h, grid_w = codes.shape[1:]
    data_key = {"dvae_sha256": file_sha256(args.dvae), "length": len(dataset), "seed": dataset.seed,
                "image_size": dataset.image_size, "grid": [int(grid_h), int(grid_w)], "image_vocab": vocab}  # fmt: skip

    if ckpt is not None:
        if ckpt["data"] != data_key:
            raise ValueError(f"--resume: the checkpoint was trained on other data/dVAE: {ckpt['data']} vs {data_key}")
        tokenizer = TextTokenizer.from_json(ckpt["tokenizer"])
        config = DALLEConfig.from_dict(ckpt["config"])
        compute_dtype = _DTYPES[ckpt["compute_dtype"]]
    else:
        tokenizer = TextTokenizer.train(captions, vocab_size=args.text_vocab, text_len=args.text_len,
                                        dropout=args.bpe_dropout)  # fmt: skip
        config = DALLEConfig.tiny(n_layers=args.layers, n_heads=args.heads, head_dim=args.head_dim,
                                  text_len=args.text_len, text_vocab=tokenizer.text_vocab, grid_h=int(grid_h),
                                  grid_w=int(grid_w), image_vocab=vocab)  # fmt: skip
        compute_dtype = resolve_dtype(args.dtype, device)
    bpe = SeededBPEDropout(tokenizer)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    backend = None if args.backend == "auto" else args.backend
    model, scaler = build_model(config, compute_dtype, device=device, backend=backend,
                                checkpoint=args.checkpointing, replicas=dd.world)  # fmt: skip
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.96), eps=1e-8)
    ema = training.EMA(model, args.ema_decay)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        training.set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        log(f"resumed from {resume_path} at step {start}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {config.n_layers} layers, d_model {config.d_model}, L = {config.seq_len} "
        f"({config.text_len} text + {grid_h}x{grid_w} image), {str(compute_dtype).replace('torch.', '')} resblocks"
        f"{' with per-resblock scaling' if scaler is not None else ''}, {dd.world} rank(s) on {device}; codes "
        f"{cache_file}")  # fmt: skip

    net = model
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.powersgd_rank > 0:
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

            state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                           start_powerSGD_iter=args.powersgd_start)  # fmt: skip
            net.register_comm_hook(state, powersgd.powerSGD_hook)
            log(f"PowerSGD rank {args.powersgd_rank} after {args.powersgd_start} all-reduce steps")

    sampler = training.StepSampler(len(dataset), args.batch_size, seed=args.seed, rank=dd.rank, world_size=dd.world)
    stop = args.stop_at or args.steps
    progress = training.Progress(stop, every=args.log_every, enabled=dd.is_main and not args.quiet,
                                 prefix="train_dalle ", start=start)  # fmt: skip
    tokens_per_step = args.batch_size * dd.world * (config.seq_len - 1)
    history, skipped = [], 0
    t_last, s_last = time.perf_counter(), start
    model.train()
    for step in range(start, stop):
        idx = sampler.indices(step)
        rng = random.Random(f"dalle_fast.bpe/{args.seed}/{step}/{dd.rank}") if tokenizer.dropout > 0 else None
        text = bpe.encode([captions[i] for i in idx], rng).to(device)
        if args.text_dropout > 0:
            rng = random.Random(f"dalle_fast.text_dropout/{args.seed}/{step}/{dd.rank}")
            text = drop_captions(text, tokenizer.pad_ids(device), args.text_dropout, rng)
        image = codes[idx].flatten(1).to(device)
        lr = training.warmup_cosine(step, warmup=args.warmup, total=args.steps, peak=args.lr, final=args.final_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        out = net(text, image)
        out.loss.backward()
        applied = optimizer_step(model, opt, scaler, args.clip, dd.world)
        opt.zero_grad(set_to_none=True)
        if applied:
            ema.update(model)
        else:
            skipped += 1
        last = step + 1 == stop
        if last or (step + 1) % args.log_every == 0:  # the same steps on every rank: dd.mean is collective
            losses = [dd.mean(float(v.detach())) for v in out]
            history.append((step, *losses))
            now = time.perf_counter()
            rate = tokens_per_step * (step + 1 - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, step + 1
            values = dict(loss=losses[0], text=losses[1], image=losses[2], lr=lr, tok_s=round(rate))
            if scaler is not None:
                values.update(skipped=skipped, min_scale=float(scaler.scales.min()))
            progress.update(step, **values)
        if (step + 1) % args.save_every == 0 or last:
            save_checkpoint(args.out, dd, step + 1, config, tokenizer, compute_dtype, model, opt, ema, scaler, args,
                            data_key)  # fmt: skip
    if start >= stop:
        log(f"nothing to do: the checkpoint is at step {start}, --steps/--stop-at {stop}")
    return {"steps": stop, "start": start, "history": history, "skipped": skipped, "out": args.out,
            "config": config, "cache": cache_file, "model": model, "tokenizer": tokenizer}  # fmt: skip


def optimizer_step(model, opt, scaler, clip: float, world: int) -> bool:
    """Unscale (per-resblock scaler), clip the gradient norm, step. Returns whether the update was applied."""
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return True
    if world > 1:  # a block's entry flag is local to its rank: agree on skipping (parameter grads are reduced)
        dist.all_reduce(scaler.found_inf, op=dist.ReduceOp.MAX)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return scaler.step(opt)


def save_checkpoint(path, dd, step, config, tokenizer, compute_dtype, model, opt, ema, scaler, args, data_key):
    if dd.is_main:
        training.atomic_save(
            {
                "format": FORMAT,
                "config": config.to_dict(),
                "tokenizer": tokenizer.to_json(),
                "compute_dtype": str(compute_dtype).replace("torch.", ""),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": step,
                "rng": training.rng_state(),
                "args": {k: v for k, v in vars(args).items()},
                "data": data_key,
            },
            path,
        )
    dd.barrier()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_dalle: error: {e}", file=sys.stderr)
        return 2
    return 0


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


if __name__ == "__main__":
    raise SystemExit(main())
