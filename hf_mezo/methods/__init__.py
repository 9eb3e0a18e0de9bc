"""Zeroth-order methods as compositions: a direction family, an estimator and an update rule.

| method | directions | estimator | update | probes per step | forwards per step |
|---|---|---|---|---|---|
| `mezo` (Malladi et al., 2023) | full Gaussian | central ±ε | SGD | 1 | 2 |
| `fzoo` (arXiv 2506.09034) | full Rademacher | one-sided, normalised by the probes' loss spread | SGD | 4 | 5 |
| `lozo` (arXiv 2410.07698) | low rank s·U·Vᵀ per matrix, V kept 50 steps | central ±ε | SGD (momentum: LOZO-M) | 1 | 2 |
| `zo_muon` (arXiv 2602.17155) | orthonormal subspace √(m/r)·P·S per matrix, P kept 100 steps | one-sided | orthogonalised | 4 | 5 |

A new method is one `ZerothOrderMethod(...)` entry: `register_method(ZerothOrderMethod("name", ...))`.
Knobs (`MeZOConfig.zo_num_directions`, `zo_distribution`, `zo_rank`, `zo_refresh_interval`, `zo_momentum`)
override a method's defaults; `None` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .estimators import CentralDifference, OneSided
from .families import DIRECTION_FAMILIES, DirectionKey, FactoredDirections, FullDirections
from .updates import SGD, Momentum, Orthogonalized, newton_schulz

ESTIMATORS = ("central", "one_sided", "one_sided_normalized")
UPDATES = ("sgd", "momentum", "orthogonalized")
DISTRIBUTIONS = ("gaussian", "rademacher")


@dataclass(frozen=True)
class ZerothOrderMethod:
    """One zeroth-order method: what its step perturbs along, measures, and applies."""

    name: str
    directions: str = "full"  # one of DIRECTION_FAMILIES
    estimator: str = "central"  # one of ESTIMATORS
    update: str = "sgd"  # one of UPDATES; "sgd" with momentum > 0 becomes "momentum"
    num_directions: int = 1  # probes per step
    distribution: str = "gaussian"  # of full directions (and of every non-matrix parameter)
    rank: int | None = None  # factored families only
    refresh_interval: int | None = None  # steps a shared factor is kept (factored families only)
    momentum: float = 0.0

    def with_overrides(self, **overrides) -> ZerothOrderMethod:
        """A copy with the knobs that are not None replaced, validated."""
        method = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        method.validate()
        return method

    def validate(self) -> None:
        if self.directions not in DIRECTION_FAMILIES:
            raise ValueError(f"directions must be one of {DIRECTION_FAMILIES}, got {self.directions!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        n = self.num_directions
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"zo_num_directions must be an integer ≥ 1 (probes per step), got {n!r}.")
        if self.estimator == "one_sided_normalized" and n < 2:
            raise ValueError(
                f"method {self.name!r} normalises by the spread of its probes' losses, which needs "
                f"zo_num_directions ≥ 2, got {n}."
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"zo_distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}.")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"zo_momentum must be in [0, 1), got {self.momentum!r}.")
        if self.directions == "full":
            if self.rank is not None or self.refresh_interval is not None:
                raise ValueError(
                    f"zo_rank / zo_refresh_interval apply to factored directions (methods 'lozo', 'zo_muon'); "
                    f"method {self.name!r} draws full directions. Unset them or choose zo_method='lozo'/'zo_muon'."
                )
            if self.momentum or self.update != "sgd":
                raise ValueError(
                    f"method {self.name!r} draws full directions, where momentum or orthogonalisation would need a "
                    "buffer the size of the model (MeZO's memory promise). Use zo_method='lozo' (zo_momentum) or "
                    "'zo_muon', whose updates act on small factors."
                )
        else:
            FactoredDirections(self.directions, self.rank, self.refresh_interval)  # validates rank / interval

    @property
    def forwards_per_step(self) -> int:
        return 2 * self.num_directions if self.estimator == "central" else self.num_directions + 1

    def build(self):
        """(direction family, estimator, update rule) objects for this method."""
        family = (
            FullDirections(self.distribution)
            if self.directions == "full"
            else FactoredDirections(self.directions, self.rank, self.refresh_interval)
        )
        if self.directions != "full":
            family.rest = FullDirections(self.distribution)
        estimator = (
            CentralDifference() if self.estimator == "central" else OneSided(self.estimator.endswith("normalized"))
        )
        if self.update == "orthogonalized":
            update = Orthogonalized(self.momentum)
        elif self.update == "momentum" or self.momentum > 0:
            update = Momentum(self.momentum)
        else:
            update = SGD()
        return family, estimator, update


METHODS: dict[str, ZerothOrderMethod] = {}


def register_method(method: ZerothOrderMethod) -> ZerothOrderMethod:
    """Make `method` selectable as `MeZOConfig(zo_method=method.name)`."""
    method.validate()
    METHODS[method.name] = method
    return method


register_method(ZerothOrderMethod("mezo"))
register_method(
    ZerothOrderMethod("fzoo", estimator="one_sided_normalized", num_directions=4, distribution="rademacher")
)
register_method(ZerothOrderMethod("lozo", directions="low_rank", rank=2, refresh_interval=50))
register_method(
    ZerothOrderMethod(
        "zo_muon", directions="subspace", estimator="one_sided", update="orthogonalized", num_directions=4,
        rank=8, refresh_interval=100,
    )
)  # fmt: skip


def resolve_method(name: str, **overrides) -> ZerothOrderMethod:
    """The registered method `name` with the knobs that are not None overriding its defaults."""
    if name not in METHODS:
        raise ValueError(f"zo_method must be one of {sorted(METHODS)}, got {name!r}.")
    return METHODS[name].with_overrides(**overrides)


__all__ = [
    "METHODS",
    "DirectionKey",
    "FactoredDirections",
    "FullDirections",
    "ZerothOrderMethod",
    "newton_schulz",
    "register_method",
    "resolve_method",
]
