"""MeZO SFT (`MeZOSFTTrainer`) vs TRL's `SFTTrainer` with AdamW: same model, data, batch and steps.

The setting of `examples/sft.py` (its defaults, its data and model loader): SmolLM2-135M-Instruct
(embedded GGUF, float32), prompt-completion pairs from the shipped SST-2 split, completion-only loss,
batch 8, the same number of optimizer steps. Each trainer runs in a fresh subprocess, which reports:

  loss before / after   held-out completion-only loss (`trainer.evaluate()`), before and after training
  train seconds         wall time of `trainer.train()` (the Trainer's train_runtime)
  peak MiB              peak resident memory during training above the resident memory after the model was
                        loaded (the kernel's peak-RSS mark is reset there, `/proc/self/clear_refs`)

MeZO's step is two forward passes and no backward; AdamW's is a forward, a backward and the Adam
update, with gradients and two moment buffers (3 × the weights) resident. Equal steps are not equal
progress: MeZO's estimate of the gradient has variance ∝ the number of parameters.

    python benchmarks/sft.py                       # both trainers, the example's defaults (minutes on CPU)
    python benchmarks/sft.py --max_steps 5 --num_train 16 --num_eval 8    # smoke run

Prints a table and writes benchmarks/results/sft.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TRAINERS = ("mezo", "adamw")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _example():
    spec = importlib.util.spec_from_file_location("sft_example", REPO / "examples" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def worker(trainer_name: str, options: argparse.Namespace) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer

    from hf_mezo import MeZOSFTConfig, MeZOSFTTrainer, load_sst2

    torch.set_num_threads(options.threads)
    example = _example()
    model, tokenizer = example.load_model_and_tokenizer(example.smollm2_dir(), example.SMOLLM2_GGUF)
    sst2 = load_sst2(k=512, seed=42)
    train = example.instruction_pairs(sst2["train"], options.num_train)
    held_out = example.instruction_pairs(sst2["validation"], options.num_eval)
    settings = {**example.EXAMPLE_DEFAULTS, "max_steps": options.max_steps, "logging_steps": options.max_steps}
    settings.update(use_cpu=True, disable_tqdm=True)
    with tempfile.TemporaryDirectory() as out:
        if trainer_name == "mezo":
            args = MeZOSFTConfig(output_dir=out, **settings)
            trainer_class = MeZOSFTTrainer
        else:
            settings = {k: v for k, v in settings.items() if not k.startswith("zo_")}
            settings.update(learning_rate=options.adamw_lr, optim="adamw_torch")
            args, trainer_class = SFTConfig(output_dir=out, **settings), SFTTrainer
        trainer = trainer_class(
            model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
        )
        before = trainer.evaluate()["eval_loss"]
        baseline = _rss_mib()
        peak_reset = _reset_peak_rss()
        metrics = trainer.train().metrics
        peak = _peak_rss_mib() - baseline
        after = trainer.evaluate()["eval_loss"]
    return {
        "trainer": trainer_name,
        "learning_rate": args.learning_rate,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_seconds": metrics["train_runtime"],
        "steps": options.max_steps,
        "peak_above_loaded_mib": peak,
        "peak_excludes_load": peak_reset,
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--num_train", type=int, default=64)
    parser.add_argument("--num_eval", type=int, default=32)
    parser.add_argument("--adamw_lr", type=float, default=1e-5, help="AdamW's learning rate (MeZO: the example's).")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "sft.json"))
    options = parser.parse_args()
    if options.worker:
        print("RESULT " + json.dumps(worker(options.worker, options)))
        return

    rows = []
    for name in TRAINERS:
        command = [sys.executable, __file__, "--worker", name] + [
            f"--{key}={getattr(options, key)}" for key in ("max_steps", "num_train", "num_eval", "adamw_lr", "threads")
        ]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            raise RuntimeError(f"{name} worker failed:\n{run.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {options.threads} threads"
    print(
        f"SmolLM2-135M-Instruct SFT, batch 8, {options.max_steps} steps, {options.num_train} train pairs ({machine})"
    )
    print(f"{'trainer':8} {'lr':>8} {'loss before':>12} {'loss after':>11} {'train s':>8} {'peak MiB':>9}")
    for row in rows:
        print(
            f"{row['trainer']:8} {row['learning_rate']:>8.0e} {row['eval_loss_before']:>12.4f} "
            f"{row['eval_loss_after']:>11.4f} {row['train_seconds']:>8.1f} {row['peak_above_loaded_mib']:>9.0f}"
        )
    mezo, adamw = rows
    ratios = {
        "time_adamw_over_mezo": adamw["train_seconds"] / mezo["train_seconds"],
        "peak_memory_adamw_over_mezo": adamw["peak_above_loaded_mib"] / max(mezo["peak_above_loaded_mib"], 1e-9),
    }
    print(
        f"AdamW / MeZO: time {ratios['time_adamw_over_mezo']:.2f}x, peak memory {ratios['peak_memory_adamw_over_mezo']:.2f}x"
    )
    write_results(
        options.output,
        {"machine": platform.platform(), "cpu": machine, "settings": vars(options), "rows": rows, **ratios},
    )


if __name__ == "__main__":
    main()
