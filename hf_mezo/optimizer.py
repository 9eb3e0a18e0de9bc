"""`ZerothOrderSGD`: zeroth-order updates (MeZO and its successors) as a `torch.optim.Optimizer`.

Being an `Optimizer` is what keeps the Trainer's machinery working: LR schedulers read and write
`param_groups[i]["lr"]`, weight decay is per group (off for bias/LayerNorm, as the Trainer groups
it), and `state_dict()` lands in `optimizer.pt` and resumes the seed stream.

The optimizer owns the direction stream. For the current step it can produce θ ± εz for any
parameter (`perturbed`), accumulates the projected gradients g that the trainer measures
(`accumulate`), and `step()` applies θ ← θ − lr·(mean_j g_j·z_j + wd·θ), regenerating each z_j from
its seed, then advances the step counter. State is O(n) scalars, never O(model). For bf16/fp16
weights z_j is replaced by the perturbation the passes actually applied, (fl(θ + εz) − fl(θ − εz))/2ε,
so coordinates whose perturbation rounded away are left exactly as they are.

Which directions, which passes and which update are the method's (`hf_mezo.methods`: a direction
family, an estimator, an update rule); the default method `"mezo"` is the two-point estimate along full
Gaussian directions with SGD, and its trajectories are those of the optimizer before methods existed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .directions import chunk_numel, draw_direction, draw_dtype
from .methods import DirectionKey, ZerothOrderMethod, resolve_method
from .methods.updates import SGD
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
        num_directions: int | None = None,
        distribution: str | None = None,
        seed: int = 0,
        stochastic_rounding: bool = True,
        method: str | ZerothOrderMethod = "mezo",
        rank: int | None = None,
        refresh_interval: int | None = None,
        momentum: float | None = None,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be ≥ 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the perturbation scale), got {eps!r}; the paper uses 1e-3")
        knobs = dict(
            num_directions=num_directions,
            distribution=distribution,
            rank=rank,
            refresh_interval=refresh_interval,
            momentum=momentum,
        )
        if isinstance(method, ZerothOrderMethod):
            method = method.with_overrides(**knobs)
        else:
            method = resolve_method(method, **knobs)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            seed=int(seed),
            zo_step=0,
            stochastic_rounding=stochastic_rounding,
            # The method's fields travel in the param groups, hence in optimizer.pt: a resumed run rebuilds
            # exactly the method it saved, registered or not.
            **{f"zo_{name}": value for name, value in vars(method).items()},
        )
        # Kept under their historic names too (read by hf_mezo.distributed's fingerprint and by callers).
        defaults.update(num_directions=method.num_directions, distribution=method.distribution)
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
        # Per probe, what the estimator accumulates for the current step, summed over micro-batches.
        self._projected_grads: list[torch.Tensor | float] = [0.0] * method.num_directions
        self._built: tuple | None = None
        self._reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._reduced: torch.Tensor | None = None
        self._skip_step = False
        self._rounding_warned: set[str] = set()
        # The seed log (`hf_mezo.seed_log`): a header and one record of scalars per step, when enabled.
        self.seed_log_header: dict | None = None
        self.seed_log: list[dict] | None = None

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

    @property
    def method(self) -> ZerothOrderMethod:
        """The method this optimizer runs, as recorded in its param groups (so also after a resume)."""
        group = self.param_groups[0]
        return ZerothOrderMethod(**{name: group[f"zo_{name}"] for name in ZerothOrderMethod.__dataclass_fields__})

    def _parts(self):
        """(direction family, estimator, update rule), rebuilt when the recorded method changes."""
        method = self.method
        if self._built is None or self._built[0] != method:
            self._built = (method, *method.build())
        return self._built[1:]

    @property
    def family(self):
        return self._parts()[0]

    @property
    def estimator(self):
        return self._parts()[1]

    @property
    def update_rule(self):
        return self._parts()[2]

    def passes(self) -> list[tuple[int | None, float]]:
        """The forward passes of one step, (probe, scale) each; probe None is the unperturbed model."""
        return self.estimator.passes(self.num_directions, self.eps)

    def accumulate_passes(self, losses: list[torch.Tensor]) -> None:
        """Fold one micro-batch's (weighted) losses of `passes()`, in that order, into the step's estimate."""
        for probe, value in enumerate(self.estimator.fold(losses, self.eps)):
            self.accumulate(probe, value)

    def mean_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The loss to log for one micro-batch's passes: the mean of ± pairs, or the unperturbed loss."""
        return self.estimator.mean_loss(losses)

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

    def _direction_key(self, param: torch.Tensor, direction: int) -> DirectionKey:
        """What z of `param` is a function of (besides the position): its name and shape, the run seed, the
        current step and the direction (probe) index; the family adds its own knobs."""
        group = self.param_groups[0]
        return DirectionKey(
            self.param_names[id(param)], tuple(param.shape), group["seed"], group["zo_step"], direction
        )

    def factored(self, param: torch.Tensor) -> bool:
        """Whether `param`'s directions are a product of small factors (low-rank / subspace families)."""
        return self.family.factored(tuple(param.shape))

    def factors(self, param: torch.Tensor, direction: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with z_direction = s·A·Bᵀ for a factored `param`, in its draw dtype."""
        return self.family.factors(self._direction_key(param, direction), draw_dtype(param.dtype), param.device)

    def direction(
        self, param: torch.Tensor, direction: int, *, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """z_direction of `param` for the current step, flattened, in its draw dtype (see `directions`)."""
        key = self._direction_key(param, direction)
        return self.family.draw(key, draw_dtype(param.dtype), param.device, start, end)

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
        """values + scale·z for elements [start, …) of `param`'s flattened z, computed in z's dtype and rounded
        once (chunk by chunk for full directions, see `directions.add_direction`); `out=values` updates in place."""
        return self.family.add(values, self._direction_key(param, direction), scale, start, out)

    def accumulate(self, direction: int, projected_grad: torch.Tensor) -> None:
        """Add one micro-batch's estimate for probe `direction` to the current step: (L₊ − L₋)/2ε for the central
        estimator, L_j − L₀ for one-sided ones (see `hf_mezo.methods.estimators`)."""
        if not torch.isfinite(projected_grad).all():
            self._skip_step = True
        self._projected_grads[direction] = self._projected_grads[direction] + projected_grad.detach().double()
        self._reduced = None

    def start_seed_log(self, build_header: Callable[[ZerothOrderSGD], dict]) -> None:
        """Record every later step's scalars (values, learning rates, skipped) for `hf_mezo.replay_seed_log`.

        `build_header(optimizer)` (`hf_mezo.seed_log.build_header`) fingerprints the trainable parameters as they are
        now: call before the first update. A log already restored from a checkpoint (`load_state_dict`) continues.
        """
        self._seed_log_header_builder = build_header
        if self.seed_log is None:
            self.seed_log_header, self.seed_log = build_header(self), []

    def inject(self, values: list[float], skipped: bool = False) -> None:
        """Set the current step's reduced estimates to `values` (a replay of recorded scalars)."""
        self._projected_grads = [torch.tensor(float(v), dtype=torch.float64) for v in values]
        self._reduced = None
        self._skip_step = bool(skipped)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.seed_log is not None:
            state["zo_seed_log"] = {"header": self.seed_log_header, "records": list(self.seed_log)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        log = state_dict.pop("zo_seed_log", None)
        super().load_state_dict(state_dict)
        if log is not None:
            self.seed_log_header, self.seed_log = log["header"], list(log["records"])
        elif self.seed_log is not None:  # logging starts at this resumed step: fingerprint the loaded weights
            self.seed_log = None
            self.start_seed_log(self._seed_log_header_builder)

    def discard_step(self) -> None:
        """Forget the projected gradients measured so far for this step (a step abandoned midway, e.g. on an
        out-of-memory retry with a smaller batch), so that they do not leak into the next step's update."""
        self._projected_grads = [0.0] * self.num_directions
        self._reduced = None
        self._skip_step = False

    def projected_grads(self) -> torch.Tensor:
        """The step's accumulated estimates (n,), averaged across processes if a reduction is installed."""
        if self._reduced is None:
            grads = torch.stack([torch.as_tensor(g, dtype=torch.float64) for g in self._projected_grads])
            device = next(p.device for _, p, _ in self.named_trainable_parameters())
            grads = grads.to(device)
            if self._reduce is not None:
                grads = self._reduce(grads)
            self._reduced = grads
        return self._reduced

    def projected_grad_norm(self) -> float:
        """RMS of the step's projected gradients g_j (directional derivative estimates): |g| for one direction.
        Logged as `grad_norm`."""
        grads = self.estimator.projected_grads(self.projected_grads(), self.eps)
        return float(grads.double().pow(2).mean().sqrt())

    # ---- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply θ ← θ − lr·(Σ_j c_j·z_j + wd·θ) (or the method's update of it) and advance to the next step.

        c_j are the estimator's coefficients (g_j / n for MeZO). A non-finite estimate skips the update
        (parameters untouched) with a warning; the step counter still advances so the next step draws fresh
        directions.
        """
        loss = closure() if closure is not None else None
        grads = self.projected_grads()
        skipped = self._skip_step or not bool(torch.isfinite(grads).all())
        if self.seed_log is not None:
            self.seed_log.append(
                {
                    "step": self.step_count,
                    "values": [float(v) for v in grads.double().cpu()],
                    "lr": [float(group["lr"]) for group in self.param_groups],
                    "skipped": skipped,
                }
            )
        if skipped:
            warnings.warn(
                f"MeZO step {self.step_count}: non-finite loss in a perturbed forward (projected gradients "
                f"{grads.tolist()}); the update is skipped and the parameters are left unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            coefficients = self.estimator.coefficients(grads, self.eps)
            plain_sgd = isinstance(self.update_rule, SGD)
            for _, param, group in self.named_trainable_parameters():
                exact_dtype = draw_dtype(param.dtype) == param.dtype
                # Low-precision weights under SGD keep the elementwise path: it updates along the perturbation
                # the passes applied (see `applied_direction`), which the factored matmul cannot.
                if self.factored(param) and (exact_dtype or not plain_sgd):
                    self._update_factored(param, group, coefficients)
                else:
                    self._update_parameter(param, group, coefficients)
        for group in self.param_groups:
            group["zo_step"] += 1
        self.family.clear()
        self.discard_step()
        return loss

    def _update_factored(self, full: torch.Tensor, group: dict, coefficients: list[float]) -> None:
        """θ ← (1 − lr·wd)·θ − lr·s·A·Bᵀ for a matrix with factored directions, one rank-r matmul.

        With SGD, A·Bᵀ = Σ_j c_j·A_j·Bᵀ is exactly Σ_j c_j·z_j; momentum and orthogonalisation transform the
        fresh factor first (`hf_mezo.methods.updates`). Low-precision weights get the float32 update rounded
        once (stochastically if enabled).
        """
        lr, weight_decay = group["lr"], group["weight_decay"]
        family, rule = self.family, self.update_rule
        param, start = local_shard(full)
        rows, cols = full.shape
        dtype, device = draw_dtype(full.dtype), param.device
        key = self._direction_key(full, 0)
        period = family.period(key.step)
        shared = family.shared_factor(key, period, dtype, device)
        fresh = None
        for probe, c in enumerate(coefficients):
            if c != 0.0:
                factor = family.fresh_factor(
                    DirectionKey(key.name, key.shape, key.run_seed, key.step, probe), dtype, device
                )
                fresh = factor * c if fresh is None else fresh.add_(factor, alpha=c)
        if fresh is None:
            fresh = torch.zeros_like(family.fresh_factor(key, dtype, device))
        estimate = rule.transform(
            fresh, shared, self.state[full], period, lambda p: family.shared_factor(key, p, dtype, device)
        )
        left, right = (estimate, shared) if family.shared_side == "right" else (shared, estimate)
        alpha = -lr * family.scale(key.shape)
        decay = 1.0 - lr * weight_decay
        moves = alpha != 0.0 and bool(estimate.any())
        if not moves and decay == 1.0:
            return  # nothing moves: leave the bits alone (adding 0 would turn -0.0 into +0.0)
        r0 = start // cols
        r1 = r0 + param.numel() // cols
        local_rows = param.view(r1 - r0, cols)
        if draw_dtype(param.dtype) == param.dtype:
            if decay != 1.0:
                local_rows.mul_(decay)
            if moves:
                local_rows.addmm_(left[r0:r1], right.t(), alpha=alpha)
            return
        updated = local_rows.float()
        if decay != 1.0:
            updated.mul_(decay)
        if moves:
            updated.addmm_(left[r0:r1].float(), right.t().float(), alpha=alpha)
        if group["stochastic_rounding"]:
            local_rows.copy_(self._stochastic_round(updated, local_rows, full, start))
        else:
            local_rows.copy_(updated)

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
