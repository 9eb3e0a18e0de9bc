"""Estimators: which forward passes a step runs, and how their losses become update coefficients.

A step runs `passes()`: pairs (probe, scale), probe None meaning the unperturbed model. Each micro-batch's
weighted pass losses are folded into one accumulator per probe (`fold`), summed over micro-batches and
averaged across processes (both linear, so gradient accumulation and data parallel are exact), and
`coefficients` turns the accumulators into the c_j of the update θ ← θ − lr·(Σ_j c_j·z_j + wd·θ).

- `CentralDifference` (MeZO): passes ±ε per probe, g_j = (L₊ − L₋)/2ε, c_j = g_j / n.
- `OneSided` (FZOO, ZO-Muon): one unperturbed pass and +ε per probe, accumulated as d_j = L_j − L₀;
  g_j = d_j/ε, c_j = g_j / n. `normalized=True` (FZOO) divides instead by the spread of the probes' losses,
  c_j = d_j / (n·σ), σ the standard deviation of the L_j (= that of the d_j: L₀ is common), which makes
  the step invariant to the loss's scale and ε.
"""

from __future__ import annotations

import math

import torch


class CentralDifference:
    """Two-point central differences: 2 forwards per probe, bias O(ε²)."""

    name = "central"

    def passes(self, num_probes: int, eps: float) -> list[tuple[int | None, float]]:
        return [(probe, scale) for probe in range(num_probes) for scale in (eps, -eps)]

    def fold(self, losses: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
        """Per probe, this micro-batch's (L₊ − L₋)/2ε (the expression MeZO has always accumulated)."""
        return [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(len(losses) // 2)]

    def mean_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(losses[2 * j] + losses[2 * j + 1]) / 2 for j in range(len(losses) // 2)]).mean()

    def projected_grads(self, accumulated: torch.Tensor, eps: float) -> torch.Tensor:
        return accumulated

    def coefficients(self, accumulated: torch.Tensor, eps: float) -> list[float]:
        n = accumulated.numel()
        return [float(g) / n for g in accumulated.double()]

    def describe(self) -> dict:
        return {"estimator": self.name}


class OneSided:
    """One unperturbed pass shared by n one-sided probes: n + 1 forwards, bias O(ε)."""

    def __init__(self, normalized: bool = False):
        self.normalized = normalized
        self.name = "one_sided_normalized" if normalized else "one_sided"

    def passes(self, num_probes: int, eps: float) -> list[tuple[int | None, float]]:
        return [(None, 0.0)] + [(probe, eps) for probe in range(num_probes)]

    def fold(self, losses: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
        """Per probe, this micro-batch's L_j − L₀ (divided by ε only at the step, after any normalisation)."""
        return [loss - losses[0] for loss in losses[1:]]

    def mean_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return losses[0]  # the unperturbed loss

    def projected_grads(self, accumulated: torch.Tensor, eps: float) -> torch.Tensor:
        return accumulated / eps

    def coefficients(self, accumulated: torch.Tensor, eps: float) -> list[float]:
        d = accumulated.double()
        n = d.numel()
        if not self.normalized:
            return [float(x) / (eps * n) for x in d]
        sigma = float(d.std()) if n > 1 else 0.0
        if not sigma > 0 or not math.isfinite(sigma):
            return [0.0] * n  # every probe measured the same loss: no direction is preferred
        return [float(x) / (n * sigma) for x in d]

    def describe(self) -> dict:
        return {"estimator": self.name}
