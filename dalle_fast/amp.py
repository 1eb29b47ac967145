"""Per-resblock gradient scaling for fp16 training (paper section 2.4 and App. D; DESIGN section 6).

Every resblock owns a gradient scale. The residual (identity) path stays fp32; a block casts its input to
fp16 at entry and its output back to fp32 at exit. In the backward pass the gradient entering the block (at
its exit) is multiplied by the block's scale before it is rounded to fp16, and the gradient leaving it (at
its entry) is divided by the scale, filtered (non-finite values zeroed) and flagged, in one fused pass
(dalle_fast.ops.scale_filter), before it joins the fp32 identity path. The block's parameter gradients stay
multiplied by its scale until the scaler unscales them, once. Parameters outside every block (embeddings,
final norm, head) are fp32 and never scaled.

    scaler = PerResblockGradScaler(n_blocks=len(blocks))
    layers = [ScaledResidual(block, scaler, i) for i, block in enumerate(blocks)]
    ...
    loss.backward()
    scaler.unscale_(optimizer)               # optional: before gradient clipping
    applied = scaler.step(optimizer)         # False: a non-finite gradient, the update was skipped

Scale rules, per block, at each step(): a block whose gradients were finite (its leaving gradient and its
parameter gradients) multiplies its scale by growth_factor; a block with a non-finite gradient divides it
by backoff_factor^-1 unless it already backed off within the last `cooldown` steps; scales are clamped to
[min_scale, max_scale]. The optimizer's update is skipped when any gradient was non-finite. init_scale,
min_scale and max_scale are multiplied by the number of data-parallel replicas.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import ops

_STATE_KEYS = (
    "n_blocks",
    "init_scale",
    "growth_factor",
    "backoff_factor",
    "min_scale",
    "max_scale",
    "cooldown",
    "replicas",
)


def _positive(name: str, v, *, integer: bool = False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(v, bool) or not isinstance(v, kind) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a {'positive integer' if integer else 'finite number > 0'}, got {v!r}")
    return int(v) if integer else float(v)


class PerResblockGradScaler:
    """One gradient scale per resblock, with the paper's update rules (see the module doc).

    `scales` is an fp32 tensor [n_blocks] on `device`; `scale(i)` is block i's 0-dim view of it, read by the
    kernels on the device. `found_inf` (int32 [n_blocks]) collects the flags of the blocks' leaving
    gradients during backward.
    """

    def __init__(
        self,
        n_blocks: int,
        *,
        init_scale: float = 2.0**13,
        growth_factor: float = 2.0 ** (1 / 1000),
        backoff_factor: float = 2.0**-0.5,
        min_scale: float = 2.0**7,
        max_scale: float = 2.0**24,
        cooldown: int = 125,
        replicas: int = 1,
        device=None,
    ):
        self.n_blocks = _positive("n_blocks", n_blocks, integer=True)
        self.init_scale = _positive("init_scale", init_scale)
        self.growth_factor = _positive("growth_factor", growth_factor)
        self.backoff_factor = _positive("backoff_factor", backoff_factor)
        if self.growth_factor < 1:
            raise ValueError(f"growth_factor: expected >= 1, got {growth_factor!r}")
        if self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor: expected a value in (0, 1), got {backoff_factor!r}")
        self.min_scale = _positive("min_scale", min_scale)
        self.max_scale = _positive("max_scale", max_scale)
        if not self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError(
                f"init_scale: expected a value in [min_scale, max_scale] = [{min_scale}, {max_scale}], got {init_scale}"
            )
        if isinstance(cooldown, bool) or not isinstance(cooldown, numbers.Integral) or cooldown < 0:
            raise ValueError(f"cooldown: expected an integer >= 0, got {cooldown!r}")
        self.cooldown = int(cooldown)
        self.replicas = _positive("replicas", replicas, integer=True)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        m = self.replicas
        self.scales = torch.full((self.n_blocks,), self.init_scale * m, dtype=torch.float32, device=self.device)
        self.found_inf = torch.zeros(self.n_blocks, dtype=torch.int32, device=self.device)
        # Step number of each block's last back-off; -cooldown lets the first back-off happen at once.
        self._last_backoff = torch.full((self.n_blocks,), -self.cooldown, dtype=torch.int64, device=self.device)
        self._step = 0
        self._blocks: dict[int, list[nn.Parameter]] = {}
        self._param_inf = torch.zeros(self.n_blocks, dtype=torch.float32, device=self.device)
        self._other_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._unscaled: set[int] = set()

    # -- blocks
    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < self.n_blocks:
            raise IndexError(f"index: expected an integer in [0, {self.n_blocks}), got {index!r}")
        return int(index)

    def register_block(self, index: int, params) -> None:
        """Declare that block `index` owns `params`: their gradients are scaled by its scale."""
        index = self._check_index(index)
        owned = {id(p) for ps in self._blocks.values() for p in ps}
        params = list(params)
        for p in params:
            if id(p) in owned:
                raise ValueError(f"register_block: a parameter of shape {tuple(p.shape)} already belongs to a block")
        self._blocks.setdefault(index, []).extend(params)

    def scale(self, index: int) -> torch.Tensor:
        """Block `index`'s scale: a 0-dim fp32 view of `scales` (device memory, never read on the host)."""
        return self.scales[self._check_index(index)]

    def flag(self, index: int) -> torch.Tensor:
        """Block `index`'s non-finite flag: a one-element int32 view of `found_inf`."""
        index = self._check_index(index)
        return self.found_inf[index : index + 1]

    # -- unscale and step
    def _optimizer_params(self, optimizer) -> list[nn.Parameter]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def unscale_(self, optimizer) -> None:
        """Divide each block's parameter gradients by its scale, in place, and record non-finite ones.

        Call it before gradient clipping; step() then does not unscale again. Once per optimizer per step.
        """
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last step()")
        in_opt = {id(p) for p in self._optimizer_params(optimizer)}
        inv = self.scales.double().reciprocal().float()
        in_blocks = set()
        for index, params in self._blocks.items():
            grads = [p.grad for p in params if id(p) in in_opt and p.grad is not None]
            in_blocks.update(id(p) for p in params)
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self._param_inf[index : index + 1], inv[index])
        others = [p.grad for p in self._optimizer_params(optimizer) if id(p) not in in_blocks and p.grad is not None]
        if others:  # fp32, unscaled: only checked
            one = torch.ones((), dtype=torch.float32, device=self.device)
            torch._amp_foreach_non_finite_check_and_unscale_(others, self._other_inf, one)
        self._unscaled.add(id(optimizer))

    def step(self, optimizer) -> bool:
        """Unscale (unless unscale_ did), update every block's scale, and run optimizer.step() unless a
        gradient was non-finite. Returns whether the update was applied (one host sync, as GradScaler)."""
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        bad = (self.found_inf != 0) | (self._param_inf != 0)
        skip = bad.any() | (self._other_inf[0] != 0)
        can_back_off = (self._step - self._last_backoff) >= self.cooldown
        back = bad & can_back_off
        scales = torch.where(back, self.scales * self.backoff_factor, self.scales)
        scales = torch.where(bad, scales, scales * self.growth_factor)
        m = self.replicas
        self.scales.copy_(scales.clamp(self.min_scale * m, self.max_scale * m))
        self._last_backoff.copy_(torch.where(back, torch.full_like(self._last_backoff, self._step), self._last_backoff))
        applied = not bool(skip)
        if applied:
            optimizer.step()
        self._step += 1
        self.found_inf.zero_()
        self._param_inf.zero_()
        self._other_inf.zero_()
        self._unscaled.clear()
        return applied

    # -- checkpoints
    def state_dict(self) -> dict:
        """Tensors and plain numbers only: loadable with torch.load(weights_only=True)."""
        state = {k: getattr(self, k) for k in _STATE_KEYS}
        state.update(scales=self.scales.detach().cpu().clone(), last_backoff=self._last_backoff.cpu().clone())
        state["step"] = self._step
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_blocks") != self.n_blocks:
            raise ValueError(f"state: expected n_blocks={self.n_blocks}, got {state.get('n_blocks')!r}")
        for k in _STATE_KEYS[1:]:
            if k in state:
                setattr(self, k, state[k])
        self.scales.copy_(state["scales"].to(self.scales))
        self._last_backoff.copy_(state["last_backoff"].to(self._last_backoff))
        self._step = int(state["step"])


# Autograd pieces of ScaledResidual -------------------------------------------------------------------------


class _BlockEntry(torch.autograd.Function):
    """fp32 -> compute dtype; backward: the leaving gradient / scale, filtered and flagged, to fp32 (one pass)."""

    @staticmethod
    def forward(ctx, x, scale, flag, dtype, backend):
        # Attributes, not saved tensors: the flags of other blocks' entries are ORed into the same buffer during
        # this backward, which would trip saved-tensor version checks.
        ctx.scale, ctx.flag = scale, flag
        ctx.x_dtype, ctx.backend = x.dtype, backend
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, flag = ctx.scale, ctx.flag
        dx = ops.scale_filter(
            grad,
            scale,
            invert=True,
            filter_nonfinite=True,
            nonfinite_flag=flag,
            dtype=ctx.x_dtype,
            backend=ctx.backend,
        )
        return dx, None, None, None, None


class _BlockExit(torch.autograd.Function):
    """compute dtype -> fp32; backward: the entering gradient * scale, rounded to the compute dtype (one pass)."""

    @staticmethod
    def forward(ctx, y, scale, backend):
        ctx.scale = scale
        ctx.y_dtype, ctx.backend = y.dtype, backend
        return y.to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return ops.scale_filter(grad, ctx.scale, dtype=ctx.y_dtype, backend=ctx.backend), None, None


class ScaledResidual(nn.Module):
    """x -> x + block(x in fp16) in fp32, with block `index`'s gradient scale of `scaler` (module doc).

    The block's parameters are registered with the scaler under `index`. `out_proj`: the block's output
    projection, a dalle_fast.nn.ScaledLinear whose output is the block's output; then that layer writes the
    block's output in fp32 itself and the entering gradient's scale rides on its backward GEMMs (no
    separate exit pass). Without it, a fused scale-and-cast pass does the exit's work. `backend` picks the
    ops' backend for the entry and exit passes (None: automatic).
    """

    def __init__(
        self,
        block: nn.Module,
        scaler: PerResblockGradScaler,
        index: int,
        *,
        out_proj: nn.Module | None = None,
        compute_dtype: torch.dtype = torch.float16,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(scaler, PerResblockGradScaler):
            raise TypeError(f"scaler: expected a PerResblockGradScaler, got {type(scaler).__name__}")
        if out_proj is not None:
            if not hasattr(out_proj, "exit_grad_scale"):
                raise TypeError(f"out_proj: expected a dalle_fast.nn.ScaledLinear, got {type(out_proj).__name__}")
            if not any(m is out_proj for m in block.modules()):
                raise ValueError("out_proj: expected a submodule of block")
        self.block = block
        self.index = scaler._check_index(index)
        self._scaler = scaler  # not a submodule: its state is saved by scaler.state_dict()
        self._out_proj = [out_proj] if out_proj is not None else []  # a list: not registered twice
        self.compute_dtype = compute_dtype
        self.backend = backend
        scaler.register_block(self.index, block.parameters())

    @property
    def scaler(self) -> PerResblockGradScaler:
        return self._scaler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"x: expected the fp32 residual stream, got {x.dtype}")
        s = self._scaler.scale(self.index)
        h = _BlockEntry.apply(x, s, self._scaler.flag(self.index), self.compute_dtype, self.backend)
        if self._out_proj:
            proj = self._out_proj[0]
            proj.exit_grad_scale = s
            try:
                y = self.block(h)
            finally:
                proj.exit_grad_scale = None
            if y.dtype != torch.float32:
                raise RuntimeError("out_proj: the block's output did not come from its output projection (not fp32)")
        else:
            y = _BlockExit.apply(self.block(h), s, self.backend)
        return x + y
