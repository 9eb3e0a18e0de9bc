"""Traffic and step time of data-parallel MeZO: bytes per step independent of the model, 2 vs 1 process.

Runs `MeZOTrainer` on a randomly initialized `RobertaForSequenceClassification` of each shape, on 2 CPU
processes (`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml`, gloo) and on 1 process
with the same global batch, and counts what the processes send: every collective the run calls
(`all_reduce`, `all_gather`, `broadcast`, DDP's `_broadcast_coalesced`, ...) is wrapped to add up the
bytes of its input tensors on each process. Variants:

  mezo        MeZOTrainer as shipped: no DDP; per step one all-reduce of the n projected gradients
              (float64) and the Trainer's and MeZO's label counts.
  mezo+ddp    the same trainer with the stock Trainer wrapping (Accelerate wraps the model in DDP on
              CPU): what DDP would add — the model broadcast at start, its gradient buckets (memory),
              and one buffer broadcast on the first forward (under no_grad DDP skips later ones).
  1 process   the same global batch on one process (no traffic), for the step-time comparison; once
              with all cores as threads, once with one thread.

    python benchmarks/distributed.py                        # tiny and roberta-base shapes (the full run)
    python benchmarks/distributed.py --shapes tiny,small --steps 2 --seq 16   # a quick smoke run

Prints a table and writes benchmarks/results/distributed.json (or --output). Step times are medians
over the measured steps (from one step's end to the next: the Trainer's batch prefetch, with MeZO's
label-count gather, happens between steps), on this machine's cores shared by all processes: with 2
cores, 2 processes have 1 thread each. Peak RSS is per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
    "small": dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "base": dict(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all_single",
    "_broadcast_coalesced",
)


# ---- worker (one per process) ----------------------------------------------------------------------


def _tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _input_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes this process contributes to one call: the input tensor(s), not the output buffers."""
    if name in ("all_gather", "gather"):  # (output_list, input) / (input, gather_list)
        return _tensor_bytes(args[1] if name == "all_gather" else args[0])
    if name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):  # (output, input)
        return _tensor_bytes(args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input")))
    if name == "_broadcast_coalesced":  # (process_group, tensors, buffer_size, src)
        return _tensor_bytes(args[1])
    return _tensor_bytes(args[0] if args else next(iter(kwargs.values()), None))


class TrafficCounter:
    """Wraps the torch.distributed collectives (both the public names and c10d's, which the object and DDP
    helpers call) and adds up the bytes of each call's inputs, per operation."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:
            for namespace in (dist, c10d):
                original = getattr(namespace, name, None)
                if original is None or getattr(original, "_counted", False):
                    continue
                setattr(namespace, name, self._counted(name, original))

    def _counted(self, name, original):
        def counted(*args, **kwargs):
            self.bytes[name] += _input_bytes(name, args, kwargs)
            self.calls[name] += 1
            return original(*args, **kwargs)

        counted._counted = True
        return counted

    def take(self) -> dict:
        snapshot = {"bytes": dict(self.bytes), "calls": dict(self.calls), "total_bytes": sum(self.bytes.values())}
        self.bytes.clear()
        self.calls.clear()
        return snapshot


def worker(options: argparse.Namespace) -> None:
    counter = TrafficCounter()
    counter.install()

    from datasets import Dataset
    from transformers import RobertaConfig, RobertaForSequenceClassification, Trainer, TrainerCallback

    from hf_mezo import MeZOConfig, MeZOTrainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    steps = options.warmup + options.steps
    config = RobertaConfig(max_position_embeddings=514, type_vocab_size=1, num_labels=2, **SHAPES[options.shape])
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (options.global_batch * steps, options.seq), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 2).tolist()})
    args = MeZOConfig(
        output_dir=options.out,
        max_steps=steps,
        per_device_train_batch_size=options.global_batch // world_size,
        learning_rate=1e-6,
        zo_num_directions=options.num_directions,
        logging_steps=10**6,  # the Trainer's loss logging adds one small gather per logging step; keep it out
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )

    class Measure(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.setup: dict = {}

        def on_train_begin(self, *a, **k):
            self.setup = counter.take()  # everything before the first step: DDP's or MeZO's start sync
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            # From the previous step's end: includes the prefetch of this step's batches and its label counts.
            now = time.perf_counter()
            self.steps.append({"time_s": now - self.last, **counter.take()})
            self.last = now

    trainer_class = MeZOTrainer
    if options.variant == "mezo+ddp":

        class WithDDP(MeZOTrainer):
            _wrap_model = Trainer._wrap_model  # the stock wrapping: Accelerate's prepare wraps in DDP

        trainer_class = WithDDP
    measure = Measure()
    trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=[measure])
    trainer.train()
    measured = measure.steps[options.warmup :]
    result = {
        "variant": options.variant,
        "shape": options.shape,
        "processes": trainer.accelerator.num_processes,
        "params": sum(p.numel() for p in model.parameters()),
        "wrapped_class": type(trainer.model_wrapped).__name__,
        "setup_bytes": measure.setup.get("total_bytes", 0),
        "step_bytes": [s["total_bytes"] for s in measured],
        "step_bytes_by_op": measured[-1]["bytes"] if measured else {},
        "step_calls_by_op": measured[-1]["calls"] if measured else {},
        "step_time_s": statistics.median(s["time_s"] for s in measured),
        "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if trainer.accelerator.is_main_process:
        Path(options.result).write_text(json.dumps(result))
    trainer.accelerator.end_training()


# ---- driver --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(
    variant: str, processes: int, threads: int, shape: str, options: argparse.Namespace, workdir: Path
) -> dict:
    result = workdir / f"{variant}-{processes}-{threads}-{shape}.json"
    worker_args = [
        str(Path(__file__).resolve()),
        "--worker",
        "--variant", variant,
        "--shape", shape,
        "--out", str(workdir / "trainer"),
        "--result", str(result),
        "--global_batch", str(options.global_batch),
        "--seq", str(options.seq),
        "--steps", str(options.steps),
        "--warmup", str(options.warmup),
        "--num_directions", str(options.num_directions),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        command = [sys.executable, *worker_args]
    else:
        config = REPO / "accelerate_configs" / "cpu_2proc.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--num_processes", str(processes), "--main_process_port", str(_free_port()), *worker_args]
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0:
        if not result.exists():
            raise RuntimeError(
                f"{variant} on {processes} process(es) failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
            )
        # Seen with the DDP comparison on gloo: the run measures and writes its result, then a process aborts
        # while tearing down ("terminate called without an active exception"). The measurement stands.
        print(f"  note: {variant} on {processes} process(es) exited with {run.returncode} after writing its result")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,base", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--global_batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num_directions", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="mezo", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options)
        return

    shapes = options.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    cores = os.cpu_count() or 1
    per_process = max(1, cores // 2)  # the machine's cores split between the 2 processes
    plan = [("mezo", 2, per_process), ("mezo+ddp", 2, per_process), ("mezo", 1, cores)]
    plan += [("mezo", 1, 1)] if cores > 1 else []
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            for variant, processes, threads in plan:
                started = time.perf_counter()
                runs.append(run_variant(variant, processes, threads, shape, options, Path(tmp)))
                elapsed = time.perf_counter() - started
                print(f"  ran {variant} on {processes} process(es) × {threads} thread(s), {shape}: {elapsed:.0f} s")

    print(
        f"\nRobertaForSequenceClassification, global batch {options.global_batch}×{options.seq}, "
        f"n = {options.num_directions}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    header = f"{'shape':6}{'params':>12}  {'variant':10}{'procs×thr':>10}{'bytes/step':>12}{'start bytes':>13}"
    print(header + f"{'step s':>9}{'RSS MiB':>9}  per-step bytes by collective")
    for run in runs:
        ops = ", ".join(f"{op} {b}" for op, b in sorted(run["step_bytes_by_op"].items())) or "-"
        print(
            f"{run['shape']:6}{run['params']:>12,}  {run['variant']:10}{run['processes']:>6}×{run['threads']:<3}"
            f"{max(run['step_bytes']):>12,}{run['setup_bytes']:>13,}{run['step_time_s']:>9.3f}"
            f"{run['peak_rss_mib']:>9.0f}  {ops}"
        )
    speedups = {}
    for shape in shapes:
        two = next(r for r in runs if r["shape"] == shape and r["variant"] == "mezo" and r["processes"] == 2)
        best_one = min(
            (r for r in runs if r["shape"] == shape and r["processes"] == 1), key=lambda r: r["step_time_s"]
        )
        speedups[shape] = best_one["step_time_s"] / two["step_time_s"]
        print(
            f"{shape}: fastest 1-process step ({best_one['threads']} thread(s)) / 2-process step = {speedups[shape]:.2f}×"
        )
    mezo_bytes = {r["shape"]: max(r["step_bytes"]) for r in runs if r["variant"] == "mezo" and r["processes"] == 2}
    print(f"MeZO bytes per step by shape: {mezo_bytes} (expected 8n + 12 = {8 * options.num_directions + 12})")

    results = {
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "settings": {
            k: getattr(options, k) for k in ("shapes", "global_batch", "seq", "steps", "warmup", "num_directions")
        },
        "runs": runs,
        "mezo_bytes_per_step": mezo_bytes,
        "one_over_two_process_step_time": speedups,
    }
    output = options.output or Path(__file__).parent / "results" / "distributed.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output = write_results(output, results)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
