"""Step time, passes over the parameters and peak memory: hf_mezo's MeZO step vs the reference algorithm.

On one batch and a randomly initialized stock `RobertaForMaskedLM` (full-vocabulary logits), times

  forward     one no-grad forward (inference),
  mezo        one MeZO step of `MeZOTrainer` (two perturbed forwards + the update),
  reference   one step of the reference algorithm (princeton-nlp/MeZO, re-implemented here from its
              description): global `torch.manual_seed`, `torch.normal` per parameter, in-place
              +ε / −2ε / +ε restore, z regenerated once more for the update,

counts how many values of z each step draws per trainable parameter ("passes"), and measures the peak
memory (RSS above the process's baseline after imports, each variant in a fresh subprocess) of
inference, a MeZO step, and a `Trainer`-style AdamW step (forward + backward + AdamW).

    python benchmarks/step_time.py                 # roberta-base shape, 16×64
    python benchmarks/step_time.py --shape large   # roberta-large shape
    python benchmarks/step_time.py --distribution rademacher --skip-memory   # z = ±1
    python benchmarks/step_time.py --methods mezo fzoo lozo zo_muon --cached-smollm2 --skip-memory \
        --output benchmarks/results/step_time_methods.json   # every zo_method, and SmolLM2 cached rows

With `--methods`, each zeroth-order method's step (`MeZOConfig(zo_method=...)`) is timed in the same
interleaved run, as a multiple of its own forwards (2 for two-point methods, probes + 1 for one-sided
ones). `--cached-smollm2` adds the same rows on a SmolLM2-135M-shaped `LlamaForPromptCausalLM` with the top
8 of 30 layers trainable and the depth cache warm (cached forward vs each method's cached step).

Prints a table and writes benchmarks/results/step_time[_<shape>].json (with the commit and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}


def build(shape: str):
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, **SHAPES[shape])
    torch.manual_seed(0)
    return RobertaForMaskedLM(config).eval()


def batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50265, (batch_size, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    labels[:, seq_len // 2] = torch.where(torch.arange(batch_size) % 2 == 0, 6587, 372)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def mezo_trainer(model, output_dir: str, distribution: str | None = "gaussian", method: str = "mezo"):
    from hf_mezo import MeZOConfig, MeZOTrainer

    args = MeZOConfig(
        output_dir=output_dir,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-6,
        disable_tqdm=True,
        zo_distribution=distribution,
        zo_method=method,
    )
    trainer = MeZOTrainer(model=model, args=args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer._zo_step_items = None
    return trainer


def mezo_step(trainer, inputs) -> None:
    trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()


class ReferenceMeZO:
    """The reference algorithm's step, as the MeZO paper's code describes it (not its code)."""

    def __init__(self, model, eps=1e-3, lr=1e-6, weight_decay=0.0):
        self.model, self.eps, self.lr, self.weight_decay = model, eps, lr, weight_decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.drawn = 0

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            self.drawn += z.numel()
            p.data = p.data + scale * self.eps * z

    @torch.no_grad()
    def step(self, inputs) -> None:
        seed = int(torch.randint(0, 1_000_000_000, ()))
        self._perturb(seed, 1)
        loss_plus = self.model(**inputs).loss
        self._perturb(seed, -2)
        loss_minus = self.model(**inputs).loss
        projected_grad = float((loss_plus - loss_minus) / (2 * self.eps))
        self._perturb(seed, 1)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            self.drawn += z.numel()
            p.data = p.data - self.lr * (projected_grad * z + self.weight_decay * p.data)


def interleaved(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each variant, run round-robin `repeats` times after one warm-up each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def count_mezo_draws(trainer, inputs) -> float:
    """Values of z drawn in one MeZO step, per trainable parameter element."""
    from hf_mezo import directions

    directions.reset_counters()
    mezo_step(trainer, inputs)
    drawn = directions.reset_counters().values
    return drawn / sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


# ---- memory: one variant per fresh process ----------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(variant: str, shape: str, batch_size: int, seq_len: int) -> None:
    torch.set_num_threads(2)
    import transformers  # noqa: F401  (imports are part of the baseline)

    import hf_mezo  # noqa: F401

    base = _rss_mib()
    model, inputs = build(shape), batch(batch_size, seq_len)
    if variant == "inference":
        with torch.no_grad():
            model(**inputs)
    elif variant == "mezo":
        with tempfile.TemporaryDirectory() as out:
            trainer = mezo_trainer(model, out)
            mezo_step(trainer, inputs)
            mezo_step(trainer, inputs)
    elif variant == "adamw":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(2):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        json.dumps(
            {"variant": variant, "baseline_mib": base, "peak_mib": peak, "peak_above_baseline_mib": peak - base}
        )
    )


def measure_memory(variant: str, shape: str, batch_size: int, seq_len: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-worker",
            variant,
            "--shape",
            shape,
            "--batch",
            str(batch_size),
            "--seq",
            str(seq_len),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distribution", choices=["gaussian", "rademacher"], default="gaussian", help="of z (timing)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true", help="only the memory comparison")
    parser.add_argument("--memory-worker", choices=["inference", "mezo", "adamw"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--methods", nargs="*", default=[], help="zo_method steps to time beside plain MeZO")
    parser.add_argument("--cached-smollm2", action="store_true", help="SmolLM2-shaped top-8 cached rows per method")
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.shape, args.batch, args.seq)
        return

    torch.set_num_threads(args.threads)
    model, inputs = build(args.shape), batch(args.batch, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    results: dict = {
        "shape": args.shape,
        "distribution": args.distribution,
        "batch": [args.batch, args.seq],
        "parameters": n_params,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads",
    }

    results["run"] = run_record()
    if args.skip_timing:
        del model
    else:
        time_steps(model, inputs, n_params, args, results)
        if args.methods:
            time_methods(model, inputs, args.methods, args.repeats, results, "methods")
            time_batched_probes(model, args, results)
    del model
    if args.cached_smollm2:
        time_cached_smollm2(args, results)
    if not args.skip_memory:
        measure_all_memory(args, results)
    suffix = ("" if args.shape == "base" else f"_{args.shape}") + (
        "" if args.distribution == "gaussian" else f"_{args.distribution}"
    )
    output = args.output or Path(__file__).parent / "results" / f"step_time{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {output}")


def time_steps(model, inputs, n_params: int, args, results: dict) -> None:
    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    with tempfile.TemporaryDirectory() as out:
        trainer = mezo_trainer(model, out, args.distribution)
        reference = ReferenceMeZO(model)
        # Interleaved (forward, step, reference, forward, ...) so that load from other processes on a shared
        # machine hits all three alike; the ratios use the fastest (least disturbed) run of each.
        times = interleaved(
            {"forward": forward, "mezo_step": lambda: mezo_step(trainer, inputs), "reference_step": lambda: reference.step(inputs)},
            args.repeats,
        )  # fmt: skip
        mezo_passes = count_mezo_draws(trainer, inputs)
    reference.drawn = 0
    reference.step(inputs)
    ref_passes = reference.drawn / n_params

    f, m, r = (min(times[k]) for k in ("forward", "mezo_step", "reference_step"))
    results["time_s"] = {"forward": f, "mezo_step": m, "reference_step": r}
    results["time_s_median"] = {k: statistics.median(t) for k, t in times.items()}
    results["passes_over_parameters"] = {"mezo": mezo_passes, "reference": ref_passes}
    results["ratios"] = {"mezo_step_over_two_forwards": m / (2 * f), "reference_over_mezo": r / m}
    median = results["time_s_median"]
    results["ratios_median"] = {"mezo_step_over_two_forwards": median["mezo_step"] / (2 * median["forward"])}

    rows = [
        ("forward (inference)", f, "", ""),
        ("MeZO step (hf_mezo)", m, f"{m / (2 * f):.2f}", f"{mezo_passes:.2f}"),
        ("MeZO step (reference)", r, f"{r / (2 * f):.2f}", f"{ref_passes:.2f}"),
    ]
    print(
        f"\n{args.shape}-shaped RobertaForMaskedLM ({n_params / 1e6:.1f}M params), batch {args.batch}×{args.seq}, {results['machine']}"
    )
    print(f"{'':24}{'min s':>10}{'× 2 fwd':>10}{'z passes':>10}  (of {args.repeats}, interleaved)")
    for name, t, ratio, passes in rows:
        print(f"{name:24}{t:10.3f}{ratio:>10}{passes:>10}")
    print(f"reference / hf_mezo step time: {r / m:.2f}×")


def run_record() -> dict:
    """The commit (and whether the tree had uncommitted changes) and the machine a result was measured on."""
    root = Path(__file__).resolve().parents[1]

    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # > the cores: other jobs shared the machine
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def time_methods(model, inputs, methods: list[str], repeats: int, results: dict, key: str, forward=None) -> None:
    """Each method's step, interleaved with the forward, as a multiple of its own forwards."""
    from hf_mezo.methods import METHODS

    forward = forward or (lambda: model(**inputs))

    def no_grad_forward() -> None:
        with torch.no_grad():
            forward()

    with tempfile.TemporaryDirectory() as out:
        trainers = {name: mezo_trainer(model, f"{out}/{name}", None, name) for name in methods}
        variants = {"forward": no_grad_forward} | {
            name: (lambda t=trainer: mezo_step(t, inputs)) for name, trainer in trainers.items()
        }
        times = interleaved(variants, repeats)
    f = min(times["forward"])
    rows = {}
    for name in methods:
        forwards = METHODS[name].forwards_per_step
        step = min(times[name])
        rows[name] = {
            "forwards_per_step": forwards,
            "step_s": step,
            "step_s_median": statistics.median(times[name]),
            "step_over_its_forwards": step / (forwards * f),
            "step_over_two_forwards": step / (2 * f),
        }
    results[key] = {"forward_s": f, "forward_s_median": statistics.median(times["forward"]), "steps": rows}
    print(f"\n{key}: forward {f:.3f} s (min of {repeats}, interleaved)")
    print(f"{'method':10}{'forwards':>10}{'step s':>10}{'× its fwd':>11}{'× 2 fwd':>10}")
    for name, row in rows.items():
        print(
            f"{name:10}{row['forwards_per_step']:>10}{row['step_s']:10.3f}{row['step_over_its_forwards']:11.2f}"
            f"{row['step_over_two_forwards']:10.2f}"
        )


def time_batched_probes(model, args, results: dict, probes: int = 4) -> None:
    """What evaluating `probes` one-sided probes in one forward of probes × the rows could save on this machine:
    a forward of 4B rows against 4 forwards of B rows (interleaved). Near 1, batching probes cannot pay."""
    small, large = batch(args.batch, args.seq), batch(probes * args.batch, args.seq)

    def run(inputs) -> None:
        with torch.no_grad():
            model(**inputs)

    times = interleaved({"one": lambda: run(small), "batched": lambda: run(large)}, args.repeats)
    ratio = min(times["batched"]) / (probes * min(times["one"]))
    results["batched_probes"] = {"probes": probes, "forward_b_s": min(times["one"]), "forward_4b_s": min(times["batched"]), "batched_over_separate": ratio}  # fmt: skip
    print(f"\none forward of {probes}×{args.batch} rows / {probes} forwards of {args.batch} rows: {ratio:.2f}")


def time_cached_smollm2(args, results: dict) -> None:
    """SmolLM2-135M shape, label-word head, top 8 of 30 layers trainable, depth cache warm."""
    from transformers import LlamaConfig

    from hf_mezo.models import LlamaForPromptCausalLM, freeze_all_but_top_layers

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForPromptCausalLM(config, label_word_ids=[13321, 1109]).eval()
    freeze_all_but_top_layers(model, 8)
    model.depth_cache.resize(1 << 34)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(args.batch) % 2}
    with torch.no_grad():
        model(**inputs)  # fills the cache: every later pass starts at layer 22
    methods = args.methods or ["mezo"]
    time_methods(model, inputs, methods, args.repeats, results, "smollm2_top8_cached")
    results["smollm2_top8_cached"]["trainable_parameters"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def measure_all_memory(args, results: dict) -> None:
    memory = {v: measure_memory(v, args.shape, args.batch, args.seq) for v in ("inference", "mezo", "adamw")}
    inf = memory["inference"]["peak_above_baseline_mib"]
    results["memory_mib"] = memory
    results.setdefault("ratios", {})
    results["ratios"]["mezo_memory_over_inference"] = memory["mezo"]["peak_above_baseline_mib"] / inf
    results["ratios"]["adamw_memory_over_mezo"] = (
        memory["adamw"]["peak_above_baseline_mib"] / memory["mezo"]["peak_above_baseline_mib"]
    )
    print(
        f"\npeak RSS above the process baseline (MiB; baseline ≈ {memory['inference']['baseline_mib']:.0f} MiB of imports)"
    )
    for v in ("inference", "mezo", "adamw"):
        above = memory[v]["peak_above_baseline_mib"]
        print(f"{v:24}{above:10.0f}{above / inf:10.2f}× inference")


if __name__ == "__main__":
    main()
