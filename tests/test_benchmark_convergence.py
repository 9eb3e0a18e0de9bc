"""benchmarks/convergence.py: runs merged per seed/method, and the summary recomputed by hand from them."""

import statistics
import sys

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
import convergence  # noqa: E402


def run(accuracy, curve, steps, forwards_per_step, peak=10.0, lr=1e-3):
    """A result as demo.train returns it; `curve` holds (step, accuracy) pairs."""
    return {
        "test_accuracy": accuracy,
        "train_s": 1.0 * steps,
        "peak_mib": peak,
        "steps": steps,
        "forward_passes": steps * forwards_per_step,
        "learning_rate": lr,
        "curve": [[s, s * forwards_per_step, 1.0 * s, a] for s, a in curve],
    }


def test_merge_then_summary_matches_a_hand_computation():
    record = {"runs": {}, "records": []}
    # Seed 13 arrives in two invocations (MeZO alone, then ZO-Muon); seed 42 in one; a rerun replaces a cell.
    convergence.merge_runs(record, {"13": {"top1": {"mezo": run(0.50, [(0, 0.5), (5, 0.6), (10, 0.7)], 10, 2)}}})
    convergence.merge_runs(record, {"13": {"top1": {"zo_muon": run(0.70, [(0, 0.5), (2, 0.7), (4, 0.7)], 4, 5)}}})
    convergence.merge_runs(record, {"13": {"top1": {"mezo": run(0.72, [(0, 0.5), (5, 0.6), (10, 0.7)], 10, 2)}}})
    convergence.merge_runs(
        record,
        {
            "42": {
                "top1": {
                    "mezo": run(0.68, [(0, 0.5), (5, 0.64), (10, 0.66)], 10, 2, peak=14.0),
                    "zo_muon": run(0.66, [(0, 0.5), (2, 0.6), (4, 0.69)], 4, 5),
                }
            }
        },
    )
    assert sorted(record["runs"]) == ["13", "42"] and sorted(record["runs"]["13"]["top1"]) == ["mezo", "zo_muon"]

    summary = convergence.summarize(record["runs"])["top1"]
    mezo, muon = summary["mezo"], summary["zo_muon"]
    assert mezo["seeds"] == muon["seeds"] == 2
    assert mezo["test_accuracy"] == pytest.approx(0.70)  # the rerun's 0.72, not the replaced 0.50
    assert mezo["test_accuracy_std"] == pytest.approx(statistics.stdev([0.72, 0.68]))
    assert mezo["peak_mib"] == pytest.approx(12.0) and muon["forward_passes"] == 20
    # Mean curves: MeZO ends at (0.70 + 0.66) / 2 = 0.68 after 20 forwards; ZO-Muon's mean is 0.65 at 10 forwards
    # and 0.695 at 20, so it first reaches 0.68 at 20 forwards: a ratio of 1 to MeZO's 20.
    assert mezo["curve"][-1] == pytest.approx([10, 20, 10.0, 0.68])
    assert muon["curve"][1] == pytest.approx([2, 10, 2.0, 0.65])
    assert muon["forwards_to_mezo_final"] == 20 and muon["forwards_ratio_to_mezo"] == pytest.approx(1.0)


def test_select_lr_keeps_the_other_sets_choices(tmp_path):
    """A --select_lr --merge run for one set (LoRA) picks its best dev learning rates and keeps the others'."""
    output = tmp_path / "convergence_lr.json"
    record = {"runs": {}, "records": [], "chosen": {"top1": {"mezo": 3e-4, "adamw": 3e-4}}}
    convergence.merge_runs(
        record,
        {
            "42": {
                "top1_lora": {
                    "mezo@0.001": run(0.66, [(0, 0.5)], 10, 2),
                    "mezo@0.002": run(0.61, [(0, 0.5)], 10, 2),
                    "adamw@0.003": run(0.78, [(0, 0.5)], 10, 1),
                    "adamw@0.001": run(0.80, [(0, 0.5)], 10, 1),
                }
            }
        },
    )
    args = convergence.parse_args(["--select_lr", f"--output={output}"])
    chosen = convergence.write(record, args, {}, output)["chosen"]
    assert chosen == {"top1": {"mezo": 3e-4, "adamw": 3e-4}, "top1_lora": {"mezo": 1e-3, "adamw": 1e-3}}
    assert convergence.lr_grid("top1_lora", "adamw") == (3e-4, 1e-3, 3e-3)
    assert convergence.lr_grid("top1", "lozo") == convergence.LR_GRID["default"]["default"]


def test_select_share_sets_the_budget_of_each_selection_run():
    """--select_lr runs 1/N of --forwards per rate: a quarter by default, the full budget with --select_share 1."""
    quarter = convergence.parse_args(["--select_lr", "--forwards=1200"])
    full = convergence.parse_args(["--select_lr", "--forwards=1200", "--select_share=1"])
    assert convergence.training_args("mezo", quarter, 1e-3, quarter.forwards // quarter.select_share).max_steps == 150
    assert convergence.training_args("mezo", full, 1e-3, full.forwards // full.select_share).max_steps == 600
    assert convergence.training_args("zo_muon", full, 1e-3, full.forwards // full.select_share).max_steps == 240
