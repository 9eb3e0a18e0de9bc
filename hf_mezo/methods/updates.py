"""Update rules on factored directions: what a step does with the estimate F = Σ_j c_j·(fresh factor)_j.

For a matrix with factored directions z_j = s·A_j·Bᵀ (or s·A·B_jᵀ), the SGD step Σ_j c_j z_j is itself
rank r: s·F·Bᵀ with F = Σ_j c_j A_j (the shared factor fixed). Update rules act on that small F:

- `SGD`: F as it is (MeZO's update, restricted to the family).
- `Momentum(β)` (LOZO-M): a buffer M ← β·M + (1 − β)·F of F's shape (r·m or r·n numbers per matrix, never
  the matrix's size). When the shared factor is re-drawn, M is carried over by least squares, so that
  M'·B'ᵀ is the best approximation of M·Bᵀ in the new factor's span: M' = M·(BᵀB')·(B'ᵀB')⁻¹.
- `Orthogonalized` (ZO-Muon): F (after momentum, if any) replaced by its orthogonalisation (quintic
  Newton–Schulz, Muon's coefficients), which equalises its singular values. The result is rescaled to the
  Frobenius norm of the SGD step it replaces, so one learning rate serves matrices and the vectors that
  keep plain SGD (the paper applies a learning rate to the orthogonal matrix and a separate, hard-coded one
  to vectors).

Parameters without factored directions (biases, norms) take the SGD step under every rule.
"""

from __future__ import annotations

import torch

# Muon's quintic Newton–Schulz coefficients (fast convergence of singular values towards 1).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately orthogonal matrix with matrix's singular vectors (singular values ≈ 1)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix / (matrix.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if tall else x


def factored_norm(fresh: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """‖F·Bᵀ‖_F computed from r × r Gram matrices: √trace((FᵀF)(BᵀB))."""
    return torch.trace((fresh.t() @ fresh) @ (shared.t() @ shared)).clamp_min(0).sqrt()


def carry_over(buffer: torch.Tensor, old_shared: torch.Tensor, new_shared: torch.Tensor) -> torch.Tensor:
    """M' = M·(BᵀB')·(B'ᵀB')⁻¹: the least-squares image of M·Bᵀ in the span of the new shared factor."""
    cross = old_shared.t() @ new_shared
    gram = new_shared.t() @ new_shared
    return torch.linalg.solve(gram, (buffer @ cross).t()).t()


class SGD:
    name = "sgd"
    stateful = False

    def transform(self, fresh, shared, state, period, old_shared) -> torch.Tensor:
        return fresh

    def describe(self) -> dict:
        return {"update": self.name}


class Momentum:
    name = "momentum"
    stateful = True

    def __init__(self, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"zo_momentum must be in [0, 1), got {beta!r}")
        self.beta = beta

    def transform(self, fresh, shared, state, period, old_shared) -> torch.Tensor:
        """Advance the buffer in `state` by F and return it. `old_shared(p)` gives the factor of period p."""
        buffer = state.get("momentum")
        if buffer is None:
            buffer = torch.zeros_like(fresh)
        elif state["momentum_period"] != period:
            buffer = carry_over(buffer, old_shared(state["momentum_period"]), shared)
        buffer = buffer.mul(self.beta).add_(fresh, alpha=1.0 - self.beta)
        state["momentum"], state["momentum_period"] = buffer, period
        return buffer

    def describe(self) -> dict:
        return {"update": self.name, "momentum": self.beta}


class Orthogonalized:
    name = "orthogonalized"

    def __init__(self, beta: float = 0.0, newton_schulz_steps: int = 5):
        self.momentum = Momentum(beta) if beta > 0 else None
        self.newton_schulz_steps = newton_schulz_steps

    @property
    def stateful(self) -> bool:
        return self.momentum is not None

    def transform(self, fresh, shared, state, period, old_shared) -> torch.Tensor:
        target = factored_norm(fresh, shared)  # the SGD step's size
        if self.momentum is not None:
            fresh = self.momentum.transform(fresh, shared, state, period, old_shared)
        if not bool(target > 0):
            return torch.zeros_like(fresh)
        orthogonal = newton_schulz(fresh, self.newton_schulz_steps)
        return orthogonal.mul_(target / factored_norm(orthogonal, shared).clamp_min(1e-30))

    def describe(self) -> dict:
        beta = 0.0 if self.momentum is None else self.momentum.beta
        return {"update": self.name, "momentum": beta, "newton_schulz_steps": self.newton_schulz_steps}
