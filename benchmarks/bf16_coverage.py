"""bf16 weights: the share of each tensor type's coordinates whose perturbation θ ± εz rounds back to θ.

A bf16 weight has 8 significant bits: its spacing is |θ|·2⁻⁷ to |θ|·2⁻⁸, so θ + εz rounds to θ whenever
|εz| is below half of that. Those coordinates are invisible to both passes (fl(θ + εz) = fl(θ − εz) = θ),
hence to g, and `ZerothOrderSGD` leaves them unchanged (it updates along the applied perturbation
(fl(θ + εz) − fl(θ − εz))/2ε instead of z). This script measures how many there are, per tensor type, on
the shapes of roberta-large (24 layers, hidden 1024, FFN 4096, vocabulary 50265) with random weights of
realistic magnitudes:

  matrices and embeddings   N(0, 0.02²)  (roberta's initializer_range; trained weights are of that order)
  LayerNorm gains           1 + N(0, 0.1²)
  LayerNorm and linear biases  N(0, 0.05²)

For ε ∈ {1e-3, 1e-2}, z is the real direction stream of `ZerothOrderSGD` (Gaussian). Each tensor type is
measured on one tensor of its roberta-large shape; "whole model" weights each type by its element count in
roberta-large. Not a timing: the figures depend on the weights' magnitudes only, not on the machine.

    python benchmarks/bf16_coverage.py

Prints a table and writes benchmarks/results/bf16_coverage.json.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hf_mezo import ZerothOrderSGD  # noqa: E402
from hf_mezo.optimizer import applied_direction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

LAYERS, HIDDEN, FFN, VOCAB, POSITIONS = 24, 1024, 4096, 50265, 514
EPSILONS = (1e-3, 1e-2)

# name: (shape, how many of them in roberta-large, initial values)
TYPES = {
    "word embeddings": ((VOCAB, HIDDEN), 1, "matrix"),
    "position embeddings": ((POSITIONS, HIDDEN), 1, "matrix"),
    "attention matrices (q, k, v, o)": ((HIDDEN, HIDDEN), 4 * LAYERS, "matrix"),
    "FFN matrices": ((FFN, HIDDEN), 2 * LAYERS, "matrix"),
    "LM head dense": ((HIDDEN, HIDDEN), 1, "matrix"),
    "LayerNorm gains": ((HIDDEN,), 2 * LAYERS + 2, "gain"),
    "LayerNorm biases": ((HIDDEN,), 2 * LAYERS + 2, "bias"),
    "linear biases": ((HIDDEN,), 4 * LAYERS + LAYERS + 1, "bias"),
    "FFN up-projection biases": ((FFN,), LAYERS, "bias"),
}


def initial(shape, kind, generator):
    values = torch.randn(shape, generator=generator)
    if kind == "matrix":
        return values.mul_(0.02).bfloat16()
    if kind == "gain":
        return values.mul_(0.1).add_(1.0).bfloat16()
    return values.mul_(0.05).bfloat16()


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (shape, count, kind) in TYPES.items():
        theta = initial(shape, kind, generator)
        param = torch.nn.Parameter(theta)
        optimizer = ZerothOrderSGD([(name, param)], eps=1e-3)
        z = optimizer.direction(param, 0).view_as(param)
        row = {"type": name, "shape": list(shape), "count": count, "numel": theta.numel() * count}
        for eps in EPSILONS:
            applied = applied_direction(theta, z, eps)
            row[f"rounded_away@{eps:g}"] = float(((applied == 0) & (z != 0)).float().mean())
        rows.append(row)
    total = sum(r["numel"] for r in rows)
    overall = {
        f"rounded_away@{eps:g}": sum(r[f"rounded_away@{eps:g}"] * r["numel"] for r in rows) / total for eps in EPSILONS
    }
    header = f"{'tensor type':34s} {'elements':>12s}" + "".join(f" {'ε = ' + format(e, 'g'):>11s}" for e in EPSILONS)
    print("bf16 roberta-large shape: share of coordinates whose perturbation rounds away (θ ± εz → θ)")
    print(header)
    for r in rows:
        cells = "".join(f" {100 * r[f'rounded_away@{e:g}']:10.1f}%" for e in EPSILONS)
        print(f"{r['type']:34s} {r['numel']:12,d}{cells}")
    print(
        f"{'whole model':34s} {total:12,d}"
        + "".join(f" {100 * overall[f'rounded_away@{e:g}']:10.1f}%" for e in EPSILONS)
    )
    result = {
        "what": "share of bf16 coordinates with fl(θ+εz) == fl(θ−εz) (perturbation rounded away), roberta-large shapes",
        "magnitudes": {"matrix": "N(0, 0.02^2)", "gain": "1 + N(0, 0.1^2)", "bias": "N(0, 0.05^2)"},
        "machine": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
        "whole_model": overall,
        "command": "python benchmarks/bf16_coverage.py",
    }
    out = HERE / "results" / "bf16_coverage.json"
    out = write_results(out, result)
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
