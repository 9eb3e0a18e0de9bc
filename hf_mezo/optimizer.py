"""`ZerothOrderSGD`: the MeZO update rule as a `torch.optim.Optimizer`.

Being an `Optimizer` is what keeps the Trainer's machinery working: LR schedulers read and write
`param_groups[i]["lr"]`, weight decay is per group (off for bias/LayerNorm, as the Trainer groups
it), and `state_dict()` lands in `optimizer.pt` and resumes the seed stream.

The optimizer owns the direction stream. For the current step it can produce θ ± εz for any
parameter (`perturbed`), accumulates the projected gradients g that the trainer measures
(`accumulate`), and `step()` applies θ ← θ − lr·(mean_j g_j·z_j + wd·θ), regenerating each z_j from
its seed, then advances the step counter. State is O(n) scalars, never O(model). For bf16/fp16
weights z_j is replaced by the perturbation the passes actually applied, (fl(θ + εz) − fl(θ − εz))/2ε,
so coordinates whose perturbation rounded away are left exactly as they are.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .config import ZO_DISTRIBUTIONS
from .directions import add_direction, chunk_numel, draw_direction, draw_dtype
from .shards import local_shard


def add_scaled(values: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """values + scale·z as a new tensor of `values`' dtype, computed in z's dtype (rounded once).

    Elementwise, so perturbing a gathered subset of a parameter gives bit-for-bit the same values as
    perturbing the whole parameter and gathering.
    """
    if z.dtype == values.dtype:
        return torch.add(values, z, alpha=scale, out=z)
    return torch.add(values.to(z.dtype), z, alpha=scale).to(values.dtype)


def applied_direction(param: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """(fl(θ + εz) − fl(θ − εz)) / 2ε per coordinate, in float32: the perturbation the two passes applied.

    For bf16/fp16 weights θ ± εz is rounded to the weights' grid, and where |εz| is below half a spacing
    both passes see θ itself: the loss difference knows nothing about that coordinate. Updating along
    z there would be a pure random walk; along the applied perturbation the coordinate stays put, and
    elsewhere the update uses the step the loss actually measured. For float32/float64 weights this is
    z up to rounding, so it is used for low precision only.
    """
    copy = (lambda t: t.clone()) if z.dtype == param.dtype else (lambda t: t)  # add_scaled may write into z
    plus = add_scaled(param, copy(z), eps).float()
    minus = add_scaled(param, copy(z), -eps).float()
    return plus.sub_(minus).div_(2 * eps)


# Warn when more than this share of a low-precision tensor's perturbation rounds away.
ROUNDED_AWAY_WARN_SHARE = 0.5

# Elements updated at a time, at least one seeded chunk of z and a multiple of it, so that with several
# directions a block never redraws a chunk that an earlier block already drew.
UPDATE_BLOCK_NUMEL = 1 << 20


class ZerothOrderSGD(torch.optim.Optimizer):
    """SGD on seeded two-point (SPSA) gradient estimates; no `.grad` is ever read or written.

    Args:
        params: named parameters, as `model.named_parameters()` or param groups whose `"params"` are
            `(name, parameter)` pairs (PyTorch ≥ 2.6). Names seed the directions, so they must be stable
            across runs and resumes.
        lr: learning rate (the paper: 1e-6 for full tuning of RoBERTa-large, 1e-4 with LoRA).
        weight_decay: decoupled-from-nothing L2 term as in MeZO: θ ← θ − lr·wd·θ.
        eps: perturbation scale ε.
        num_directions: directions per step (n-SPSA); their projected gradients are averaged.
        distribution: "gaussian" or "rademacher".
        seed: run seed of the direction stream.
        stochastic_rounding: round updates of bf16/fp16 parameters stochastically.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        eps: float = 1e-3,
        num_directions: int = 1,
        distribution: str = "gaussian",
        seed: int = 0,
        stochastic_rounding: bool = True,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be ≥ 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the perturbation scale), got {eps!r}; the paper uses 1e-3")
        if not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(f"num_directions must be an integer ≥ 1, got {num_directions!r}")
        if distribution not in ZO_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {ZO_DISTRIBUTIONS}, got {distribution!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            num_directions=num_directions,
            distribution=distribution,
            seed=int(seed),
            zo_step=0,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults)
        if not any(p.requires_grad for group in self.param_groups for p in group["params"]):
            raise ValueError(
                "ZerothOrderSGD got no parameters to train: every parameter is frozen (requires_grad=False). "
                "Unfreeze the parameters to tune, or attach an adapter (peft) first."
            )
        self.param_names: dict[int, str] = {}
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None:
                raise TypeError(
                    "ZerothOrderSGD needs named parameters: directions are seeded by parameter name so that they do "
                    "not depend on which other parameters exist. Pass `model.named_parameters()` (or groups whose "
                    "'params' are (name, parameter) pairs) instead of bare parameters."
                )
            self.param_names.update({id(p): name for p, name in zip(group["params"], names)})
        # Projected gradients measured for the current step, summed over micro-batches (one per direction).
        self._projected_grads: list[torch.Tensor | float] = [0.0] * num_directions
        self._reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._reduced: torch.Tensor | None = None
        self._skip_step = False
        self._rounding_warned: set[str] = set()

    # ---- state shared with the trainer -------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far; seeds the directions of the next step."""
        return self.param_groups[0]["zo_step"]

    @property
    def eps(self) -> float:
        return self.param_groups[0]["eps"]

    @property
    def num_directions(self) -> int:
        return self.param_groups[0]["num_directions"]

    def set_reduction(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Install a mean-reduction across processes for the projected gradients (one small tensor a step)."""
        self._reduce = reduce

    def named_trainable_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter, dict]]:
        """(name, parameter, group) of every parameter MeZO perturbs and updates: those with requires_grad.

        A frozen parameter in the groups (`ZerothOrderSGD(model.named_parameters())` on a partly frozen
        model) is never perturbed and never moved, even if it was frozen after the optimizer was built.
        """
        for group in self.param_groups:
            # Names travel with the groups: Accelerate's FSDP2 preparation swaps `params` for their shards.
            for p, name in zip(group["params"], group["param_names"]):
                if p.requires_grad:
                    self.param_names[id(p)] = name
                    yield name, p, group

    def _direction_key(self, param: torch.Tensor, direction: int) -> dict:
        """What z of `param` is a function of (besides the position): its name and size, the run seed, the
        current step, the direction index and the distribution."""
        group = self.param_groups[0]
        return {
            "name": self.param_names[id(param)],
            "numel": param.numel(),
            "run_seed": group["seed"],
            "step": group["zo_step"],
            "direction": direction,
            "distribution": group["distribution"],
        }

    def direction(
        self, param: torch.Tensor, direction: int, *, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """z_direction of `param` for the current step, flattened, in its draw dtype (see `directions`)."""
        return draw_direction(
            **self._direction_key(param, direction),
            dtype=draw_dtype(param.dtype),
            device=param.device,
            start=start,
            end=end,
        )

    @torch.no_grad()
    def perturbed(self, param: torch.Tensor, direction: int, scale: float) -> torch.Tensor:
        """A new tensor θ + scale·z, computed in the draw dtype and rounded once to the parameter's dtype.

        `param` itself is never modified, which is what makes the restore after a perturbed forward exact.
        """
        return self.perturbed_slice(param, direction, scale).view_as(param)

    @torch.no_grad()
    def perturbed_slice(
        self, param: torch.Tensor, direction: int, scale: float, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Elements [start, end) of the flattened θ + scale·z (for streaming large matrices block by block)."""
        return self.add_direction(param.reshape(-1)[start:end], param, direction, scale, start)

    def add_direction(
        self,
        values: torch.Tensor,
        param: torch.Tensor,
        direction: int,
        scale: float,
        start: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """values + scale·z for elements [start, …) of `param`'s flattened z, fused chunk by chunk (see
        `directions.add_direction`); `out=values` updates in place."""
        return add_direction(
            values,
            **self._direction_key(param, direction),
            scale=scale,
            start=start,
            out=out,
        )

    def accumulate(self, direction: int, projected_grad: torch.Tensor) -> None:
        """Add one micro-batch's projected gradient (L₊ − L₋)/2ε for `direction` to the current step."""
        if not torch.isfinite(projected_grad).all():
            self._skip_step = True
        self._projected_grads[direction] = self._projected_grads[direction] + projected_grad.detach().double()
        self._reduced = None

    def discard_step(self) -> None:
        """Forget the projected gradients measured so far for this step (a step abandoned midway, e.g. on an
        out-of-memory retry with a smaller batch), so that they do not leak into the next step's update."""
        self._projected_grads = [0.0] * self.num_directions
        self._reduced = None
        self._skip_step = False

    def projected_grads(self) -> torch.Tensor:
        """The step's projected gradients (n,), averaged across processes if a reduction is installed."""
        if self._reduced is None:
            grads = torch.stack([torch.as_tensor(g, dtype=torch.float64) for g in self._projected_grads])
            device = next(p.device for _, p, _ in self.named_trainable_parameters())
            grads = grads.to(device)
            if self._reduce is not None:
                grads = self._reduce(grads)
            self._reduced = grads
        return self._reduced

    def projected_grad_norm(self) -> float:
        """RMS of the step's projected gradients: |g| for one direction. Logged as `grad_norm`."""
        grads = self.projected_grads()
        return float(grads.double().pow(2).mean().sqrt())

    # ---- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply θ ← θ − lr·(mean_j g_j·z_j + wd·θ) and advance to the next step's directions.

        A non-finite projected gradient skips the update (parameters untouched) with a warning; the step
        counter still advances so the next step draws fresh directions.
        """
        loss = closure() if closure is not None else None
        grads = self.projected_grads()
        n = self.num_directions
        if self._skip_step or not torch.isfinite(grads).all():
            warnings.warn(
                f"MeZO step {self.step_count}: non-finite loss in a perturbed forward (projected gradients "
                f"{grads.tolist()}); the update is skipped and the parameters are left unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            coefficients = [float(g) / n for g in grads.double()]
            for _, param, group in self.named_trainable_parameters():
                self._update_parameter(param, group, coefficients)
        for group in self.param_groups:
            group["zo_step"] += 1
        self.discard_step()
        return loss

    def _update_parameter(self, param: torch.Tensor, group: dict, coefficients: list[float]) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        full = param
        param, start = local_shard(full)  # this process's rows of a sharded (FSDP2) parameter, else all of it
        steps = [(d, -lr * c) for d, c in enumerate(coefficients) if lr * c != 0.0]
        decay = 1.0 - lr * weight_decay
        if not steps and decay == 1.0:
            return  # nothing moves: leave the bits alone (adding 0 would turn -0.0 into +0.0)
        # Block by block along the flattened parameter: z (and, for bf16/fp16 weights, the float32 update and
        # the rounding's temporaries) exist for one block at a time, not for the whole vocabulary matrix.
        # Every operation is elementwise and every random number is keyed by its position, so the result is
        # bit-identical to updating the whole tensor at once.
        flat = param.view(-1) if param.is_contiguous() else param
        block_numel = max(UPDATE_BLOCK_NUMEL, chunk_numel(param.device)) if param.is_contiguous() else param.numel()
        for lo in range(0, param.numel(), block_numel):
            block = flat[lo : lo + block_numel] if flat.dim() == 1 else flat
            span = {"start": start + lo, "end": start + lo + block.numel()}
            if draw_dtype(param.dtype) == param.dtype:
                if decay != 1.0:
                    block.mul_(decay)
                for direction, alpha in steps:
                    self.add_direction(block, full, direction, alpha, span["start"], out=block)
                continue
            # Low-precision weights: accumulate the update in float32, round once, and move each coordinate
            # along the perturbation the passes applied, not along z (see `applied_direction`).
            updated = block.float()
            if decay != 1.0:
                updated.mul_(decay)
            for direction, alpha in steps:
                z = self.direction(full, direction, **span).view_as(block)
                applied = applied_direction(block, z, group["eps"])
                if direction == 0:
                    self._note_rounded_away(full, applied, z)
                updated.add_(applied, alpha=alpha)
            if group["stochastic_rounding"]:
                block.copy_(self._stochastic_round(updated, block, full, span["start"]))
            else:
                block.copy_(updated)

    def _note_rounded_away(self, param: torch.Tensor, applied: torch.Tensor, z: torch.Tensor) -> None:
        """Warn once per tensor when most of its perturbation is below the weights' resolution."""
        name = self.param_names[id(param)]
        if name in self._rounding_warned:
            return
        self._rounding_warned.add(name)
        share = float(((applied == 0) & (z != 0)).float().mean())
        if share > ROUNDED_AWAY_WARN_SHARE:
            warnings.warn(
                f"MeZO: θ ± εz rounds back to θ for {share:.0%} of {name!r} ({param.dtype}, ε = {self.eps:g}); "
                "those coordinates are not perturbed, so they are not trained. Raise zo_eps, or keep this tensor "
                "in float32 (e.g. LayerNorm gains, whose |θ| ≈ 1 makes the bf16 spacing 2⁻⁷).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _stochastic_round(
        self, value: torch.Tensor, param: torch.Tensor, full: torch.Tensor | None = None, start: int = 0
    ) -> torch.Tensor:
        """Round float32 `value` to `param.dtype`, up or down with probability by distance (unbiased).

        The random bits come from the parameter's own seeded stream (a direction index no direction uses),
        so the rounding is as reproducible as the directions. `param` may be the shard at flat offset
        `start` of the parameter `full`; its bits are then that slice of the full parameter's.
        """
        full = param if full is None else full
        group = self.param_groups[0]
        uniform = draw_direction(
            self.param_names[id(full)] + "#rounding",
            full.numel(),
            run_seed=group["seed"],
            step=group["zo_step"],
            direction=0,
            distribution="uniform",
            dtype=torch.float32,
            device=param.device,
            start=start,
            end=start + param.numel(),
        ).view_as(param)
        if param.dtype == torch.bfloat16 and value.dtype == torch.float32 and value.is_contiguous():
            # bf16 is float32 without its low 16 bits. Adding a uniform 16-bit integer to the float32 bits and
            # clearing the low 16 rounds the magnitude up with probability (low bits)/2¹⁶: stochastic rounding in
            # three integer operations (a carry crosses into the next binade correctly; inf and NaN stay).
            noise = uniform.mul_(65536.0).to(torch.int32)
            bits = value.view(torch.int32).add(noise).bitwise_and_(-65536)
            return bits.view(torch.float32).to(torch.bfloat16)
        nearest = value.to(param.dtype)
        nearest32 = nearest.float()
        toward = torch.where(
            nearest32 > value, torch.full_like(nearest, -math.inf), torch.full_like(nearest, math.inf)
        )
        other = torch.nextafter(nearest, toward).float()
        gap = (other - nearest32).abs()
        p_other = torch.where(gap > 0, (value - nearest32).abs() / gap, torch.zeros_like(gap))
        rounded = torch.where(uniform < p_other, other, nearest32)
        return rounded.to(param.dtype)
