"""Peak memory of MeZO with bf16 weights vs fp32 weights vs bf16 inference (roberta-large shape).

Each variant runs in a fresh subprocess, builds a randomly initialized `RobertaForMaskedLM` directly in
its dtype (never an fp32 copy first), resets the kernel's peak-RSS mark (`/proc/self/clear_refs`, so
the transient of building the model does not count), runs its workload and reports the peak resident
memory during the run above the process's RSS after imports:

  inference-fp32 / inference-bf16   one no-grad forward with labels (the MLM loss over the full vocabulary)
  mezo-fp32 / mezo-bf16             one MeZO step of `MeZOTrainer`: two perturbed forwards + the update (bf16:
                                    float32 logits in the passes, stochastic rounding in the update)
  mezo-bf16-bf16loss                mezo-bf16 with `zo_float32_logits=False`: what the float32 logits and loss cost
  mezo-bf16-lora                    the same on a bf16 base with a peft LoRA adapter (r = 8, query/value)

    python benchmarks/memory.py                               # roberta-large shape, batch 4 × 64 tokens
    python benchmarks/memory.py --shape tiny --batch 2 --seq 16   # smoke run, seconds

Prints a table and writes benchmarks/results/memory[_<shape>].json (the roberta-large run: memory.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

SHAPES = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
VOCAB = 50265
VARIANTS = ("inference-fp32", "inference-bf16", "mezo-fp32", "mezo-bf16", "mezo-bf16-bf16loss", "mezo-bf16-lora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(shape: str, dtype: torch.dtype):
    from transformers import AutoModelForMaskedLM, RobertaConfig

    config = RobertaConfig(vocab_size=VOCAB, max_position_embeddings=514, type_vocab_size=1, **SHAPES[shape])
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(config, dtype=dtype).eval()  # allocated in `dtype` from the start


def batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    labels[:, seq_len // 2] = torch.where(torch.arange(batch_size) % 2 == 0, 6587, 372)  # ' terrible' / ' great'
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def worker(variant: str, shape: str, batch_size: int, seq_len: int, threads: int) -> None:
    torch.set_num_threads(threads)
    import peft  # noqa: F401  (imports are part of the baseline)
    import transformers  # noqa: F401

    from hf_mezo import MeZOConfig, MeZOTrainer, lora_config_for_mezo

    baseline = _rss_mib()
    kind, precision = variant.split("-")[:2]
    model, inputs = build(shape, DTYPES[precision]), batch(batch_size, seq_len)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    gc.collect()
    resident_after_build = _rss_mib()
    peak_of_build = _peak_rss_mib()
    peak_reset = _reset_peak_rss()
    start = time.perf_counter()
    if kind == "inference":
        with torch.no_grad():
            loss = model(**inputs).loss
        steps = 0
    else:
        if variant.endswith("lora"):
            from peft import get_peft_model

            model = get_peft_model(model, lora_config_for_mezo())
        with tempfile.TemporaryDirectory() as out:
            args = MeZOConfig(
                output_dir=out,
                report_to=[],
                use_cpu=True,
                learning_rate=1e-6,
                disable_tqdm=True,
                zo_float32_logits=not variant.endswith("bf16loss"),
            )
            trainer = MeZOTrainer(model=model, args=args)
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1
            trainer._zo_step_items = None
            steps = 1
            for _ in range(steps):
                loss = trainer.training_step(trainer.model, inputs)
                trainer.optimizer.step()
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    print(
        json.dumps(
            {
                "variant": variant,
                "weights_mib": weights_mib,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad) if steps else 0,
                "baseline_mib": baseline,
                "resident_after_build_mib": resident_after_build - baseline,
                "peak_of_build_mib": peak_of_build - baseline,
                "peak_excludes_build": peak_reset,
                "peak_above_baseline_mib": peak - baseline,
                "seconds": seconds,
                "steps": steps,
                "loss": float(loss),
            }
        )
    )


def measure(variant: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--shape", args.shape]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="large")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.shape, args.batch, args.seq, args.threads)
        return

    results = {v: measure(v, args) for v in args.variants}
    reference = results.get("inference-bf16")
    print(f"\nroberta-{args.shape} shape, batch {args.batch} × {args.seq} tokens, {args.threads} threads")
    excludes_build = all(r["peak_excludes_build"] for r in results.values())
    print(
        "MiB above the process's post-import RSS; peak during the run"
        + (" (the build's transient excluded)\n" if excludes_build else " (including building the model)\n")
    )
    header = (
        f"{'variant':18s} {'weights':>8s} {'resident':>9s} {'peak':>7s} {'peak − weights':>15s} "
        f"{'× bf16 inference':>17s} {'run s':>7s}"
    )
    print(header)
    print("-" * len(header))
    for variant, r in results.items():
        ratio = r["peak_above_baseline_mib"] / reference["peak_above_baseline_mib"] if reference else float("nan")
        print(
            f"{variant:18s} {r['weights_mib']:8.0f} {r['resident_after_build_mib']:9.0f} "
            f"{r['peak_above_baseline_mib']:7.0f} {r['peak_above_baseline_mib'] - r['weights_mib']:15.0f} "
            f"{ratio:17.2f} {r['seconds']:7.1f}"
        )
    report = {
        "shape": args.shape,
        "config": SHAPES[args.shape] | {"vocab_size": VOCAB},
        "batch": args.batch,
        "seq_len": args.seq,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "results_mib": results,
    }
    name = "memory.json" if args.shape == "large" else f"memory_{args.shape}.json"
    path = Path(__file__).resolve().parent / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path = write_results(path, report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
