"""Direction families: along which z a method perturbs each parameter, as a pure function of seeds.

- `FullDirections` (MeZO, FZOO): z over every element, Gaussian or Rademacher, drawn by the seeded stream
  of `hf_mezo.directions` (z of an element depends on its name and position only).
- `FactoredDirections`: for a matrix W (m × n) with min(m, n) > rank, z = s·A·Bᵀ with A (m × r) and
  B (n × r) drawn from their own seeds; one factor is fresh every step and probe, the other is *shared*:
  kept for `refresh_interval` steps and by every probe of a step.
  - `kind="low_rank"` (LOZO): A = U ~ N(0, 1) fresh, B = V ~ N(0, 1) shared; s = 1/√r, so every element
    of z has unit variance and ε and the learning rate carry over from MeZO (the paper's unscaled UVᵀ is
    ε·√r, lr·r here).
  - `kind="subspace"` (ZO-Muon): A = P, an orthonormal basis (QR of a seeded Gaussian) shared, B = Sᵀ with
    S ~ N(0, 1) (r × n) fresh; z = √(m/r)·P·S lies in the r-dimensional column space of P, elements of unit
    variance on average.
  Parameters that are not such matrices (biases, norms, small or >2-D tensors) get full Gaussian directions.

Factors are drawn by the same seeded stream under derived names (`<param>#U`, `#V`, `#P`, `#S`), with the
refresh period in place of the step for the shared factor: a trajectory stays a function of (run seed,
step, probe, name). They are small (r·(m + n) values): fresh factors are cached for the current step,
shared ones for their period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..directions import add_direction, draw_direction, draw_dtype

DIRECTION_FAMILIES = ("full", "low_rank", "subspace")


@dataclass(frozen=True)
class DirectionKey:
    """Which z: parameter `name` (of `shape`), run seed, optimizer step, probe index."""

    name: str
    shape: tuple[int, ...]
    run_seed: int
    step: int
    probe: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FullDirections:
    """z drawn element by element from the seeded stream: N(0, I) or Rademacher (±1)."""

    kind = "full"

    def __init__(self, distribution: str = "gaussian"):
        self.distribution = distribution

    def factored(self, shape: tuple[int, ...]) -> bool:
        return False

    def draw(self, key: DirectionKey, dtype: torch.dtype, device, start: int = 0, end: int | None = None):
        """Elements [start, end) of the flattened z, a new tensor of `dtype`."""
        return draw_direction(
            key.name, key.numel, run_seed=key.run_seed, step=key.step, direction=key.probe,
            distribution=self.distribution, dtype=dtype, device=device, start=start, end=end,
        )  # fmt: skip

    def add(self, values: torch.Tensor, key: DirectionKey, scale: float, start: int = 0, out=None) -> torch.Tensor:
        """values + scale·z for elements [start, …) of the flattened z (fused chunk by chunk)."""
        return add_direction(
            values, key.name, key.numel, run_seed=key.run_seed, step=key.step, direction=key.probe,
            distribution=self.distribution, scale=scale, start=start, out=out,
        )  # fmt: skip

    def clear(self) -> None:
        pass

    def describe(self) -> dict:
        return {"family": "full", "distribution": self.distribution}


class FactoredDirections:
    """z = s·A·Bᵀ per matrix (see the module docstring); full Gaussian directions for everything else."""

    def __init__(self, kind: str, rank: int, refresh_interval: int):
        if kind not in ("low_rank", "subspace"):
            raise ValueError(f"FactoredDirections kind must be 'low_rank' or 'subspace', got {kind!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"zo_rank must be an integer ≥ 1, got {rank!r}")
        if not isinstance(refresh_interval, int) or isinstance(refresh_interval, bool) or refresh_interval < 1:
            raise ValueError(f"zo_refresh_interval must be an integer ≥ 1 (steps), got {refresh_interval!r}")
        self.kind, self.rank, self.refresh_interval = kind, rank, refresh_interval
        self.rest = FullDirections("gaussian")
        self._cache: dict[tuple, torch.Tensor] = {}

    # ---- which parameters, and their factors ----------------------------------------------------

    def factored(self, shape: tuple[int, ...]) -> bool:
        """Matrices whose both sides exceed the rank: a rank-r factorisation is a real restriction there."""
        return len(shape) == 2 and min(shape) > self.rank

    @property
    def shared_side(self) -> str:
        """Which factor is kept across probes and steps: B (= V) for low rank, A (= P) for the subspace."""
        return "right" if self.kind == "low_rank" else "left"

    def period(self, step: int) -> int:
        """The refresh period of `step`: the shared factor is a function of it, not of the step."""
        return step // self.refresh_interval

    def scale(self, shape: tuple[int, ...]) -> float:
        m, _ = shape
        return 1.0 / math.sqrt(self.rank) if self.kind == "low_rank" else math.sqrt(m / self.rank)

    def shared_factor(self, key: DirectionKey, period: int, dtype: torch.dtype, device) -> torch.Tensor:
        """V (n × r) for low rank, P (m × r, orthonormal columns) for the subspace, of refresh period `period`."""
        m, n = key.shape
        cache_key = ("shared", key.name, key.shape, key.run_seed, period, dtype, torch.device(device))
        if cache_key not in self._cache:
            for stale in [k for k in self._cache if k[0] == "shared" and k[1:3] == cache_key[1:3]]:
                del self._cache[stale]  # another period's factor of this parameter
            rows = n if self.kind == "low_rank" else m
            tag = "#V" if self.kind == "low_rank" else "#P"
            factor = self._gaussian(key.name + tag, rows, key.run_seed, period, 0, dtype, device)
            if self.kind == "subspace":
                factor = torch.linalg.qr(factor)[0]  # deterministic (Householder) for a given input
            self._cache[cache_key] = factor
        return self._cache[cache_key]

    def fresh_factor(self, key: DirectionKey, dtype: torch.dtype, device) -> torch.Tensor:
        """U (m × r) for low rank, Sᵀ (n × r) for the subspace: new every step and probe."""
        m, n = key.shape
        cache_key = ("fresh", key.name, key.shape, key.run_seed, key.step, key.probe, dtype, torch.device(device))
        if cache_key not in self._cache:
            rows, tag = (m, "#U") if self.kind == "low_rank" else (n, "#S")
            self._cache[cache_key] = self._gaussian(
                key.name + tag, rows, key.run_seed, key.step, key.probe, dtype, device
            )
        return self._cache[cache_key]

    def factors(self, key: DirectionKey, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with z = s·A·Bᵀ."""
        shared = self.shared_factor(key, self.period(key.step), dtype, device)
        fresh = self.fresh_factor(key, dtype, device)
        left, right = (fresh, shared) if self.shared_side == "right" else (shared, fresh)
        return left, right, self.scale(key.shape)

    def _gaussian(self, name, rows, run_seed, step, probe, dtype, device) -> torch.Tensor:
        return draw_direction(
            name, rows * self.rank, run_seed=run_seed, step=step, direction=probe, distribution="gaussian",
            dtype=dtype, device=device,
        ).view(rows, self.rank)  # fmt: skip

    def clear(self) -> None:
        """Forget the fresh factors (called after each update: the next step draws new ones). Shared factors stay
        cached for the rest of their refresh period (a QR per matrix per period, not per step)."""
        for cache_key in [k for k in self._cache if k[0] == "fresh"]:
            del self._cache[cache_key]

    # ---- z and θ + s·z -----------------------------------------------------------------------------

    def rows(self, key: DirectionKey, dtype: torch.dtype, device, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of z = s·A·Bᵀ, in `dtype`."""
        left, right, s = self.factors(key, dtype, device)
        return torch.mm(left[r0:r1], right.t()).mul_(s)

    def draw(self, key: DirectionKey, dtype: torch.dtype, device, start: int = 0, end: int | None = None):
        if not self.factored(key.shape):
            return self.rest.draw(key, dtype, device, start, end)
        n = key.shape[1]
        end = key.numel if end is None else end
        if not 0 <= start <= end <= key.numel:
            raise ValueError(
                f"direction slice [{start}, {end}) is outside parameter {key.name!r} of {key.numel} elements"
            )
        r0, r1 = start // n, -(-end // n)
        return self.rows(key, dtype, device, r0, r1).view(-1)[start - r0 * n : end - r0 * n]

    def add(self, values: torch.Tensor, key: DirectionKey, scale: float, start: int = 0, out=None) -> torch.Tensor:
        if not self.factored(key.shape):
            return self.rest.add(values, key, scale, start, out)
        dtype = draw_dtype(values.dtype)
        z = self.draw(key, dtype, values.device, start, start + values.numel()).view_as(values)
        out = torch.empty_like(values, memory_format=torch.contiguous_format) if out is None else out
        # Computed in z's dtype and rounded once to values' dtype, as the full family does.
        return torch.add(values, z, alpha=scale, out=out)

    def describe(self) -> dict:
        return {"family": self.kind, "rank": self.rank, "refresh_interval": self.refresh_interval}
