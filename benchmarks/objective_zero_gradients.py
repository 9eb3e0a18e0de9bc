"""How often is MeZO's projected gradient exactly 0? Accuracy as the objective vs the cross-entropy, on the MLM demo.

Runs `examples/run_sst2.py` with the masked-LM demo's configuration (`examples/demo_mlm.py`'s `DEMO_ARGS`:
MiniLM-L6 with the label-word head, SST-2 k = 512, batch 64; recorded in the JSON) for a few hundred steps with
`grad_norm` (= |g|) logged every step, once per objective:

  cross_entropy          the model's loss (the default), ε = 1e-3
  negative_accuracy      `--zo_objective negative_accuracy` (0/1 accuracy over the batch of 16), ε = 1e-3
  negative_accuracy      the same with ε = 1e-1 (the paper's prefix-tuning ε), a larger perturbation

and counts the steps with g == 0 (L₊ = L₋: no prediction of the batch flipped, so no update).

    python benchmarks/objective_zero_gradients.py                  # 300 steps per run
    python benchmarks/objective_zero_gradients.py --steps 50       # quicker

Prints a table and writes benchmarks/results/objective_zero_gradients.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
RUNS = (("cross_entropy", None, "1e-3"), ("negative_accuracy", "negative_accuracy", "1e-3"))
RUNS += (("negative_accuracy", "negative_accuracy", "1e-1"),)


def _demo():
    spec = importlib.util.spec_from_file_location("demo_mlm", EXAMPLES / "demo_mlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(objective: str | None, eps: str, steps: int, output_dir: str) -> dict:
    demo = _demo()
    overrides = [
        "--max_steps", str(steps), "--logging_steps", "1", "--zo_eps", eps,
        "--eval_strategy", "no", "--zero_shot_eval", "false", "--max_test_samples", "64",
        "--output_dir", output_dir,
    ]  # fmt: skip
    if objective is not None:
        overrides += ["--zo_objective", objective]
    sys.path.insert(0, str(EXAMPLES))
    import run_sst2

    start = time.perf_counter()
    run_sst2.main(demo.merged_argv(overrides))
    seconds = time.perf_counter() - start
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    grads = [h["grad_norm"] for h in history if "grad_norm" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    nonzero = [g for g in grads if g != 0]
    return {
        "steps": len(grads),
        "zero_fraction": sum(g == 0 for g in grads) / len(grads),
        "median_abs_g_nonzero": statistics.median(nonzero) if nonzero else 0.0,
        "first_loss": losses[0],
        "last_loss_mean_of_10": statistics.fmean(losses[-10:]),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = []
    for name, objective, eps in RUNS:
        with tempfile.TemporaryDirectory() as out:
            results.append({"objective": name, "zo_eps": float(eps), **run(objective, eps, args.steps, out)})

    print(f"\nMeZO on the MLM demo (MiniLM-L6, SST-2 k=512, batch 64), {args.steps} steps per run\n")
    header = (
        f"{'objective':18s} {'ε':>6s} {'steps with g = 0':>17s} {'median |g| (g≠0)':>17s} {'loss first → last':>20s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        losses = f"{r['first_loss']:.3f} → {r['last_loss_mean_of_10']:.3f}"
        print(
            f"{r['objective']:18s} {r['zo_eps']:6.0e} {r['zero_fraction']:17.1%} "
            f"{r['median_abs_g_nonzero']:17.3g} {losses:>20s}"
        )
    path = HERE / "results" / "objective_zero_gradients.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path = write_results(path, {"steps": args.steps, "demo_args": _demo().DEMO_ARGS, "runs": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
