"""The zero-shot demo in miniature: train the dVAE and the transformer on the synthetic shapes captions (split
"train"), then generate images for captions of the held-out split (combinations of colour and shape never seen
in training) and measure, with the data set's attribute checker, how often the image shows what the caption says.

    python -m dalle_fast.demo --out runs/demo                    # --recipe quick: ~23 min on 2 cores, all ~0.24
    python -m dalle_fast.demo --out runs/demo --skip-training    # evaluate the checkpoints already in runs/demo
    python -m dalle_fast.demo --out runs/long --recipe accurate  # ~66 min on 2 cores: all 0.84-0.91 (README)

--recipe sets the defaults of the steps, the dVAE seeds, the captions, the samples and the seed, and puts its own
train_dvae and train_dalle flags before --dvae-args and --dalle-args (so that the ones given win); RECIPES lists
them.

The dVAE trains --dvae-steps steps of the ELB, then --dvae-decoder-steps steps of its decoder alone on the argmax
codes of its (then fixed) encoder (train_dvae --decoder-steps), the codes the transformer learns and generates.
Whether a dVAE separates the colours is a matter of its seed; --dvae-seeds N (the accurate recipe: 2) trains N
of them side by side, one process each, and keeps the one whose reconstructions of fresh training-split scenes
the checker reads best (dvae_check; OUT/dvae_seeds holds the candidates and their logs).
The transformer is trained with 10% empty captions (train_dalle --text-dropout 0.1) so that sampling can use
classifier-free guidance (--guidance-scale); each caption's samples are reranked (--rerank) by the model itself:
"likelihood" by log p(image | caption) (the default: with guidance, better on longer-trained models and equal
within noise on the defaults'), or "contrastive", log p(image | caption) against the captions one word away
(data.caption_variants) and the empty caption (nn.decoding.contrastive_scorer), which helps unguided sampling,
where the likelihood alone favours images with fewer objects (README, "The zero-shot demo", has the measurements).

Writes OUT/dvae/dvae.pt, OUT/dalle.pt, OUT/zero_shot.png (one row per caption: the generated samples, best first
by the reranker), OUT/zero_shot.txt (the captions and what the checker read) and prints the accuracy:
  generated  the best-ranked sample of each held-out caption (data.check "all": count, shape, colour, position)
  dVAE       the dVAE's reconstruction of the true image of the same scene (what the tokens can show at best)
  true       the true render (the checker's own ceiling at this image size)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch


def _dvae_argv(args, out: str, seed: int, threads: int | None = None) -> list[str]:
    """train_dvae's argv for one dVAE of the demo: the demo's flags, then --threads (when given), then
    --dvae-args (the recipe's, then the caller's: the last of a flag wins)."""
    return ["--out", out, "--steps", str(args.dvae_steps), "--decoder-steps", str(args.dvae_decoder_steps),
            "--seed", str(seed), "--device", "cpu", *(["--threads", str(threads)] if threads else []),
            *args.dvae_args.split()]  # fmt: skip


def _train_dvae(args) -> str:
    from . import train_dvae

    out = os.path.join(args.out, "dvae")
    if args.dvae_seeds > 1:
        return _train_dvae_seeds(args, out)
    if train_dvae.main(_dvae_argv(args, out, args.seed)) != 0:  # its --threads holds for the dVAE only
        raise SystemExit("demo: the dVAE training failed")
    return os.path.join(out, train_dvae.CHECKPOINT_NAME)


# --dvae-seeds: the candidates are ranked on fresh scenes of the training split (colour-shape pairs the dVAE saw,
# scenes it did not), never on the held-out split that the demo's figure is read on.
SELECT_SCENES, SELECT_SEED = 200, 1000


@torch.no_grad()
def dvae_check(dvae_path: str) -> dict:
    """data.check of the argmax reconstructions (EMA weights, what load_dvae returns) of SELECT_SCENES fresh
    training-split scenes: {attribute: fraction right} over count, shape, colour, position and all."""
    from .train_dvae import check_accuracy, load_dvae, scene_set

    vae = load_dvae(dvae_path)
    return check_accuracy(vae, *scene_set("train", SELECT_SCENES, vae.image_size, SELECT_SEED))["recon"]


def _launch(argv: list[str], log) -> subprocess.Popen:
    """One train_dvae process (stdout and stderr to `log`), importing this copy of dalle_fast."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return subprocess.Popen([sys.executable, "-m", "dalle_fast.train_dvae", *argv], stdout=log, stderr=log, env=env)


def _last_line(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = f.read().decode(errors="replace").replace("\r", "\n").split("\n")
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "(no output yet)")


def _train_dvae_seeds(args, out: str, poll_s: float = 1.0, report_s: float = 120.0) -> str:
    """Train --dvae-seeds dVAEs (seeds --seed, --seed + 1, ...) side by side, one process each (--threads: the
    cores this process may use, shared out, unless --dvae-args sets it), keep the one whose reconstructions
    dvae_check reads best (ties: the lowest seed) and copy its checkpoint to `out`. Colour separation is a matter
    of the seed (README, "The zero-shot demo"): N seeds make a failed one the choice only if all N fail."""
    from . import training
    from .train_dvae import CHECKPOINT_NAME

    seeds = [args.seed + i for i in range(args.dvae_seeds)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    root = os.path.join(args.out, "dvae_seeds")
    os.makedirs(root, exist_ok=True)
    runs = {}
    try:
        for s in seeds:
            log_path = os.path.join(root, f"seed{s}.log")
            log = open(log_path, "w")  # noqa: SIM115 (closed when the process ends)
            argv = _dvae_argv(args, os.path.join(root, f"seed{s}"), s, threads=max(1, cores // len(seeds)))
            runs[s] = (_launch(argv, log), log, log_path)
        print(f"demo: training {len(seeds)} dVAEs side by side (seeds {', '.join(map(str, seeds))}; logs in {root})")
        last = time.monotonic()
        while any(p.poll() is None for p, _, _ in runs.values()):
            time.sleep(poll_s)
            if time.monotonic() - last >= report_s:
                last = time.monotonic()
                for s, (_, _, log_path) in runs.items():
                    print(f"demo: dVAE seed {s}: {_last_line(log_path)}", flush=True)
    finally:
        for p, log, _ in runs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    failed = [
        f"seed {s} (exit status {p.returncode}; {log_path})" for s, (p, _, log_path) in runs.items() if p.returncode
    ]
    if failed:
        raise SystemExit(f"demo: the dVAE training failed: {'; '.join(failed)}")
    checks = {s: dvae_check(os.path.join(root, f"seed{s}", CHECKPOINT_NAME)) for s in seeds}
    best = max(seeds, key=lambda s: (checks[s]["all"], -s))
    for s in seeds:
        c = checks[s]
        print(
            f"demo: dVAE seed {s}: data.check of {SELECT_SCENES} fresh training-split scenes (EMA weights): all "
            f"{c['all']:.3f} (shape {c['shape']:.3f}, colour {c['colour']:.3f}){'  <- kept' if s == best else ''}"
        )
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CHECKPOINT_NAME)
    training.atomic_save(training.load_checkpoint(os.path.join(root, f"seed{best}", CHECKPOINT_NAME)), path)
    return path


def _train_dalle(args, dvae_path: str) -> str:
    from . import train_dalle

    out = os.path.join(args.out, "dalle.pt")
    argv = ["--dvae", dvae_path, "--out", out, "--steps", str(args.dalle_steps), "--seed", str(args.seed),
            "--cache-dir", os.path.join(args.out, "codes"), "--device", "cpu", "--text-dropout", "0.1",
            *args.dalle_args.split()]  # fmt: skip
    if train_dalle.main(argv) != 0:
        raise SystemExit("demo: the transformer training failed")
    return out


RERANKERS = ("contrastive", "likelihood")
# --recipe: the defaults of the command's flags. "quick" is the demo in about 23 minutes on 2 cores (far below the
# issue's 0.80); "accurate" the recipe measured at 0.80 and above (README, "The zero-shot demo"): an object-weighted
# dVAE (seeds 3 and 4 side by side, the better kept: colour separation depends on the seed) and a transformer trained
# longer on 4x the scenes.
RECIPES = {
    "quick": {"about": "~23 min on 2 cores, all ~0.24", "dvae_steps": 8000, "dvae_decoder_steps": 4000,
              "dalle_steps": 1500, "dvae_args": "", "dalle_args": "", "captions": 64, "samples": 16, "seed": 0,
              "dvae_seeds": 1},
    "accurate": {"about": "~66 min on 2 cores, all 0.84-0.91", "dvae_steps": 12000,
                 "dvae_decoder_steps": 4000, "dalle_steps": 12000,
                 "dvae_args": "--object-weight 8 --threads 1", "dalle_args": "--data-length 40000 --seed 0",
                 "captions": 128, "samples": 32, "seed": 3, "dvae_seeds": 2},
}  # fmt: skip


@torch.no_grad()
def evaluate(
    dalle_path: str,
    dvae_path: str,
    *,
    captions: int,
    samples: int,
    seed: int,
    top_k: int | None,
    temperature: float,
    guidance_scale: float = 1.0,
    rerank_by: str = "contrastive",
    backend=None,
) -> dict:
    """Generate `samples` images for each of the first `captions` held-out scenes, rank them (rerank_by:
    "contrastive", nn.decoding.contrastive_scorer against the captions one word away, data.caption_variants, and
    the empty caption; "likelihood", the model's log p(image | caption)) and check the best one; the dVAE's
    reconstructions and the true renders of the same scenes are checked too."""
    from . import data
    from .nn.decoding import contrastive_scorer, null_text, rerank
    from .train_dalle import load_dalle
    from .train_dvae import load_dvae

    if rerank_by not in RERANKERS:
        raise ValueError(f"rerank_by: expected one of {RERANKERS}, got {rerank_by!r}")
    model, tok = load_dalle(dalle_path, backend=backend)
    vae = load_dvae(dvae_path)
    test = data.SyntheticShapes("test", captions, vae.image_size, seed=seed)
    scenes = [test.scene(i) for i in range(captions)]
    true = torch.stack([test[i][0] for i in range(captions)])
    text = tok.encode([s.caption for s in scenes])
    t0 = time.perf_counter()
    codes = model.generate(text, num_samples=samples, seed=seed, top_k=top_k, temperature=temperature,
                           guidance_scale=guidance_scale)  # fmt: skip
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    best = []  # [N, S, H, W], best first
    for scene, t, c in zip(scenes, text, codes):
        scorer = None
        if rerank_by == "contrastive":
            negatives = torch.cat([tok.encode(data.caption_variants(scene.caption)), null_text(model)])
            scorer = contrastive_scorer(model, negatives)
        best.append(rerank(model, t, c, scorer=scorer)[0])
    best = torch.stack(best)
    rerank_s = time.perf_counter() - t0
    images = vae.decode(best.flatten(0, 1)).view(captions, samples, 3, vae.image_size, vae.image_size)
    recon = vae.decode(vae.get_codebook_indices(true))
    checks = {
        "generated": [data.check(images[i, 0], scenes[i]) for i in range(captions)],
        "dvae": [data.check(recon[i], scenes[i]) for i in range(captions)],
        "true": [data.check(true[i], scenes[i]) for i in range(captions)],
    }
    summary = {k: {a: sum(c[a] for c in v) / captions for a in v[0]} for k, v in checks.items()}
    return {"summary": summary, "checks": checks, "scenes": scenes, "images": images, "generate_s": gen_s,
            "rerank_s": rerank_s, "images_per_s": captions * samples / gen_s}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dalle_fast.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="quick",
                    help="the defaults of the flags below (README, 'The zero-shot demo'): " + "; ".join(
                        f"{k}: {v['about']}" for k, v in RECIPES.items()))  # fmt: skip
    ap.add_argument("--dvae-steps", type=int, default=None, help="train_dvae --steps (6000 or more: colour needs it)")
    ap.add_argument("--dvae-decoder-steps", type=int, default=None,
                    help="train_dvae --decoder-steps: then the decoder alone on argmax codes (0: none)")  # fmt: skip
    ap.add_argument("--dvae-seeds", type=int, default=None,
                    help="train this many dVAEs side by side (seeds --seed, --seed + 1, ...) and keep the one whose "
                    "reconstructions of fresh training-split scenes data.check reads best")  # fmt: skip
    ap.add_argument("--dalle-steps", type=int, default=None)
    ap.add_argument("--dvae-args", default="",
                    help="more train_dvae flags, after the recipe's (so they win), e.g. '--threads 1'")  # fmt: skip
    ap.add_argument("--dalle-args", default="",
                    help="more train_dalle flags, after the recipe's (so they win), e.g. '--layers 4'")  # fmt: skip
    ap.add_argument("--captions", type=int, default=None, help="held-out captions to generate for")
    ap.add_argument("--samples", type=int, default=None, help="samples per caption (the best by --rerank is checked)")
    ap.add_argument(
        "--rerank",
        choices=RERANKERS,
        default="likelihood",
        help="likelihood: log p(image | caption); contrastive: against the captions one word away",
    )
    ap.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance (1: off)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None, help="seeds both stages and the sampling")
    ap.add_argument("--skip-training", action="store_true", help="evaluate the checkpoints already in --out")
    args = ap.parse_args(argv)
    recipe = RECIPES[args.recipe]
    for name in ("dvae_steps", "dvae_decoder_steps", "dvae_seeds", "dalle_steps", "captions", "samples", "seed"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.dvae_args = " ".join(filter(None, (recipe["dvae_args"], args.dvae_args)))
    args.dalle_args = " ".join(filter(None, (recipe["dalle_args"], args.dalle_args)))
    for name in ("dvae_steps", "dvae_seeds", "dalle_steps", "captions", "samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.dvae_decoder_steps < 0:
        ap.error(f"--dvae-decoder-steps: expected an integer >= 0, got {args.dvae_decoder_steps}")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        ap.error(f"--guidance-scale: expected a finite number >= 0 (1: off), got {args.guidance_scale}")
    from . import data

    t0 = time.perf_counter()
    if args.skip_training:
        dvae_path, dalle_path = os.path.join(args.out, "dvae", "dvae.pt"), os.path.join(args.out, "dalle.pt")
    else:
        dvae_path = _train_dvae(args)
        dalle_path = _train_dalle(args, dvae_path)
    train_s = time.perf_counter() - t0
    res = evaluate(dalle_path, dvae_path, captions=args.captions, samples=args.samples, seed=args.seed,
                   top_k=args.top_k, temperature=args.temperature, guidance_scale=args.guidance_scale,
                   rerank_by=args.rerank)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    grid = data.image_grid(res["images"].flatten(0, 1), ncol=args.samples)
    data.write_png(os.path.join(args.out, "zero_shot.png"), grid)
    with open(os.path.join(args.out, "zero_shot.txt"), "w") as f:
        for i, (scene, check) in enumerate(zip(res["scenes"], res["checks"]["generated"])):
            f.write(f"{i:3d} {'ok  ' if check['all'] else 'miss'} {scene.caption}  {json.dumps(check)}\n")
    s = res["summary"]
    print(f"demo: recipe {args.recipe}; training {train_s / 60:.1f} min; generation {res['images_per_s']:.2f} images/s")
    print(f"demo: {args.captions} held-out captions (colour-shape combinations never seen in training), "
          f"{args.samples} samples each, the best by the {args.rerank} reranker checked "
          f"(guidance scale {args.guidance_scale:g}):")  # fmt: skip
    for k in ("generated", "dvae", "true"):
        attrs = ", ".join(f"{a} {v:.2f}" for a, v in s[k].items() if a != "all")
        print(f"  {k:<9} all {s[k]['all']:.3f}  ({attrs})")
    print(f"demo: wrote {os.path.join(args.out, 'zero_shot.png')} and zero_shot.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
