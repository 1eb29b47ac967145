"""What both training commands share: schedules, EMA, atomic checkpoints with exact resume, step-indexed
sampling, distributed setup and a progress line.

Exact resume rests on three rules: (1) every random choice a step makes is a pure function of (seed, step,
rank) — the batch (StepSampler), the Gumbel noise seed (step_seed), BPE dropout — or comes from the RNG states
saved in the checkpoint (rng_state / set_rng_state); (2) the checkpoint holds everything that changes during
training (model, optimizer, EMA, scaler, step) and is written atomically (atomic_save: a crash while saving
leaves the previous file intact); (3) checkpoints hold only tensors and plain Python values, so they load
with torch.load(..., weights_only=True).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

# Schedules -----------------------------------------------------------------------------------------------


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step >= total): start + (end - start) * (1 -
    cos(pi t)) / 2, t = min(step / total, 1). The paper's schedules for tau, beta and the step size."""
    if total <= 0:
        return float(end)
    t = min(max(step, 0) / total, 1.0)
    return float(start + (end - start) * (1 - math.cos(math.pi * t)) / 2)


def warmup_cosine(step: int, *, warmup: int, total: int, peak: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, final)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for the random-stream ops of one step (Gumbel noise): a pure function of (seed, step,
    rank), so a resumed run draws the noise the uninterrupted one would have."""
    return random.Random(f"dalle_fast.step/{int(seed)}/{int(step)}/{int(rank)}").getrandbits(63)


# Data ----------------------------------------------------------------------------------------------------


class StepSampler:
    """The indices of the batch of each step, a pure function of (seed, step, rank): the data set is shuffled
    once per epoch (permutation from seed and epoch), the global batch of step s is positions [s*G, (s+1)*G)
    of the epoch-major stream (G = batch_size * world_size) and rank r takes its r-th slice. Resuming at step s
    needs nothing but s."""

    def __init__(self, length: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise ValueError(f"length: expected a data set with at least one item, got {length}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.length, self.batch_size, self.seed, self.rank, self.world = length, batch_size, seed, rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.length, generator=g))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        g = self.batch_size * self.world
        first = step * g + self.rank * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, i = divmod(pos, self.length)
            out.append(int(self._permutation(epoch)[i]))
        return out

    def epoch(self, step: int) -> float:
        return step * self.batch_size * self.world / self.length


# EMA -----------------------------------------------------------------------------------------------------


class EMA:
    """An exponential moving average of a module's floating-point parameters and buffers (fp32 copies):
    shadow = decay * shadow + (1 - decay) * param after each update, with the warm-up decay
    min(decay, (1 + n) / (10 + n)) so that early averages are not dominated by the initialisation."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.decay, self.updates = float(decay), 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into `module` (cast to each parameter's dtype)."""
        state = module.state_dict()
        module.load_state_dict({k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()})

    def averaged(self, module: nn.Module) -> nn.Module:
        """A deep copy of `module` holding the averaged weights (for sampling and evaluation)."""
        m = copy.deepcopy(module)
        self.copy_to(m)
        return m

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state: keys differ from the module's: {sorted(missing)[:5]}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# Random state --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """The states of Python's, torch's CPU and (if any) every CUDA generator, as weights_only-loadable values."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Checkpoints ---------------------------------------------------------------------------------------------


def atomic_save(obj, path) -> None:
    """torch.save(obj, path) such that `path` always holds either the previous complete file or the new one:
    write a temporary file in the same directory, flush it to disk, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(path, weights_only=True) with an error that names the file when it is missing or not ours."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise ValueError(f"checkpoint: {path!r} is not a dalle_fast checkpoint (no 'format' key)")
    return ckpt


# Distributed ---------------------------------------------------------------------------------------------


class Dist:
    """The process's place in a torchrun job (or a single process): rank, world size, device, is_main."""

    def __init__(self, device: str | None = None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        self.device = torch.device(device)
        self.initialized = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.initialized = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a Python number over ranks (for logging)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


# Progress ------------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress display: redrawn in place on a terminal, a plain line every `every` steps (and the
    last) otherwise, so logs stay short. progress.update(step, loss=..., kl=...) formats floats compactly.

    The rate counts the steps done since the display was made: `start` is the step the run begins at (0, or a
    resumed run's first step); without it, the step of the first update, which is right only when every step is
    reported."""

    def __init__(self, total: int, *, every: int = 10, stream=None, enabled: bool = True, prefix: str = "",
                 start: int | None = None):  # fmt: skip
        self.total, self.every, self.enabled, self.prefix = total, max(1, every), enabled, prefix
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.first_step: int | None = start

    def update(self, step: int, **values) -> None:
        """Report that step `step` (0-based) finished, with named values."""
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = step
        done = step + 1
        last = done >= self.total
        if not self.tty and not last and done % self.every:
            return
        elapsed = time.perf_counter() - self.start
        rate = (done - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        width = 20
        filled = int(width * done / max(self.total, 1))
        parts = [f"{k} {_fmt(v)}" for k, v in values.items()]
        line = (f"{self.prefix}[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                + " | ".join(parts) + f" | {rate:.2f} it/s eta {_duration(eta)}")  # fmt: skip
        if self.tty:
            self.stream.write("\r" + line + ("\n" if last else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
