"""Shared-prefix KV: forward and MeZO step time with vs without sharing the batch's common prompt prefix.

On a randomly initialized SmolLM2-135M-shaped `LlamaForPromptCausalLM` (30 layers, hidden 576, 9 heads / 3 KV
heads, intermediate 1536, vocabulary 49,152, tied embeddings; label-word head) and one batch of prompts whose
sentences vary in length around `--example_len` tokens (right padded), each behind a common prefix:

  instruction   an instruction `--prefix_ratio` (3) times the mean example length
  4-shot        `--shots` (4) demonstrations: whole examples with their label word and a separator

times, with `share_prefix` off and on (the same model, the same batch; ratios side by side in one run)

  forward       no grad, class logits and loss (eval mode)
  MeZO step     two perturbed forwards + the update (`ZerothOrderSGD` + `perturbed_forward`, as `MeZOTrainer`
                takes it), all 134.5M parameters trainable, and with a LoRA adapter (r = 8 on q/v; only the
                step is timed: the forward is the same work)

and checks that the class logits agree (max |Δ|). Target (issue 13): ≥ 2× on the step with the instruction. The
first batch size runs both prefixes, the later ones the instruction only. Perturbing all parameters costs the same
with or without sharing (z for 134.5M weights, in each pass), which bounds the full-parameter step's speed-up.

    python benchmarks/shared_prefix.py
    python benchmarks/shared_prefix.py --batch_sizes 16 --repeats 5
    python benchmarks/shared_prefix.py --smoke        # a tiny Llama: checks that it runs

Prints a table and writes benchmarks/results/shared_prefix.json (shared_prefix_smoke.json for --smoke).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import HfArgumentParser, LlamaConfig

from hf_mezo.adapters import lora_config_for_mezo
from hf_mezo.models import LlamaForPromptCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from model_variant import CAUSAL_SHAPES, CAUSAL_VOCAB_SIZE, label_words, mezo_step, synchronize, trainable_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402


@dataclass
class BenchmarkArguments:
    shape: str = field(default="smollm2", metadata={"help": "smollm2 or causal-tiny."})
    batch_sizes: list[int] = field(
        default_factory=lambda: [16, 64],
        metadata={"help": "Examples per batch; the later sizes are run with the instruction prefix only."},
    )
    example_len: int = field(default=24, metadata={"help": "Mean tokens per example (sentence + 'It was')."})
    prefix_ratio: float = field(default=3.0, metadata={"help": "Instruction length / mean example length."})
    shots: int = field(default=4, metadata={"help": "Demonstrations in the k-shot prefix."})
    repeats: int = field(default=3, metadata={"help": "Timed runs per measurement (median reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs before each measurement."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    smoke: bool = field(default=False, metadata={"help": "Tiny Llama, batch 4, one repeat: checks it runs."})
    output: str | None = field(default=None, metadata={"help": "JSON path (default benchmarks/results/...)."})


def prompt_batch(prefix: torch.Tensor, batch_size: int, args: BenchmarkArguments, vocab_size: int, generator) -> dict:
    """Rows = prefix + a random example of length example_len ± 1/3, right padded; class-index labels."""
    low, high = max(2, args.example_len * 2 // 3), args.example_len * 4 // 3
    lengths = torch.randint(low, high + 1, (batch_size,), generator=generator).tolist()
    width = len(prefix) + max(lengths)
    ids = torch.zeros((batch_size, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.cat([prefix, torch.randint(3, vocab_size, (n,), generator=generator)])
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    labels = torch.arange(batch_size) % 2
    return {k: v.to(args.device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def prefixes(args: BenchmarkArguments, vocab_size: int, generator) -> dict[str, torch.Tensor]:
    instruction = torch.randint(3, vocab_size, (round(args.prefix_ratio * args.example_len),), generator=generator)
    words = label_words(vocab_size, causal=True)
    demonstrations = []
    for shot in range(args.shots):  # example, its label word, a separator (two tokens standing for "\n\n")
        demonstrations += [torch.randint(3, vocab_size, (args.example_len,), generator=generator)]
        demonstrations += [torch.tensor([words[shot % 2], 198, 198])]
    return {"instruction": instruction, f"{args.shots}-shot": torch.cat(demonstrations)}


def alternating_medians(fn, args: BenchmarkArguments) -> dict[bool, float]:
    """Median seconds of fn(False) and fn(True), run alternately `repeats` times after `warmup` rounds."""
    times = {False: [], True: []}
    for round_index in range(args.warmup + args.repeats):
        for share in (False, True):
            synchronize(args.device)
            start = time.perf_counter()
            fn(share)
            synchronize(args.device)
            if round_index >= args.warmup:
                times[share].append(time.perf_counter() - start)
    return {share: statistics.median(values) for share, values in times.items()}


def measure(model, batch, args: BenchmarkArguments, with_forward: bool = True) -> dict:
    """Forward (optional) and MeZO step, sharing off then on. `model` may be a peft model around the prompt LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    results = {"unshared": {}, "shared": {}}
    logits = {}
    model.eval()
    for share in (False, True):  # before any step changes the weights
        base.share_prefix = share
        with torch.no_grad():
            logits[share] = model(**batch).logits
    # Off and on alternate within each repeat, so a change in the machine's load hits both alike.
    optimizers = {share: trainable_optimizer(model) for share in (False, True)}

    def forward(share):
        base.share_prefix = share
        with torch.no_grad():
            model(**batch)

    def step(share):
        base.share_prefix = share
        mezo_step(model, optimizers[share], batch)

    for name, fn in (("forward", forward), ("step", step)) if with_forward else (("step", step),):
        times = alternating_medians(fn, args)
        for share, seconds in times.items():
            results["shared" if share else "unshared"][name] = seconds
    base.reset_shared_prefix_stats()
    with torch.no_grad():
        model(**batch)
    stats = base.shared_prefix_stats
    run = {
        "seconds": results,
        "step speed-up": results["unshared"]["step"] / results["shared"]["step"],
        "max |Δ class logits|": float((logits[True] - logits[False]).abs().max()),
        "shared tokens": stats["last_shared_tokens"],
        "saved token-layers per forward": stats["saved_token_layers"],
        "trainable parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch": list(batch["input_ids"].shape),
        "attended tokens": int(batch["attention_mask"].sum()),
    }
    if with_forward:
        run["forward speed-up"] = results["unshared"]["forward"] / results["shared"]["forward"]
    return run


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    vocab_size = CAUSAL_VOCAB_SIZE
    if args.smoke:
        args.shape, args.batch_sizes, args.example_len, args.repeats, vocab_size = "causal-tiny", [4, 8], 12, 1, 1000
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=2048, tie_word_embeddings=True, **CAUSAL_SHAPES[args.shape]
    )
    model = LlamaForPromptCausalLM(config, label_word_ids=label_words(vocab_size, causal=True)).to(args.device)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    print(machine)
    print(
        f"{args.shape}-shaped LlamaForPromptCausalLM, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    )
    generator = torch.Generator().manual_seed(1)
    prefix_tokens = prefixes(args, vocab_size, generator)
    grid = [
        (name, batch_size)
        for index, batch_size in enumerate(args.batch_sizes)
        for name in (prefix_tokens if index == 0 else ["instruction"])
    ]
    batches = {key: prompt_batch(prefix_tokens[key[0]], key[1], args, vocab_size, generator) for key in grid}
    runs = []
    print(f"{'prefix':13}{'trainable':>10}{'batch':>9}{'P':>5}{'fwd off':>9}{'fwd on':>8}{'×':>6}{'step off':>9}"
          f"{'step on':>8}{'×':>6}{'max|Δ|':>9}")  # fmt: skip
    for trainable in ("all", "lora"):
        if trainable == "lora":  # MeZO + LoRA (the paper's r = 8, α = 16 on q/v): the perturbation is cheap
            model = get_peft_model(model, lora_config_for_mezo())
        for name, batch_size in grid:
            run = measure(model, batches[name, batch_size], args, with_forward=trainable == "all")
            run.update(prefix=name, trainable=trainable)
            runs.append(run)
            s = run["seconds"]
            forward = (
                f"{s['unshared']['forward']:9.3f}{s['shared']['forward']:8.3f}{run['forward speed-up']:6.2f}"
                if "forward speed-up" in run
                else f"{'':23}"
            )
            print(
                f"{name:13}{trainable:>10}{'×'.join(map(str, run['batch'])):>9}{run['shared tokens']:>5}{forward}"
                f"{s['unshared']['step']:9.3f}{s['shared']['step']:8.3f}{run['step speed-up']:6.2f}"
                f"{run['max |Δ class logits|']:9.1e}"
            )
    first = [r for r in runs if r["prefix"] == "instruction" and r["batch"][0] == args.batch_sizes[0]]
    met = {r["trainable"]: r["step speed-up"] >= 2.0 for r in first}
    print(f"target: step ≥ 2× with the instruction prefix at batch {args.batch_sizes[0]}: {met}")
    results = {"machine": machine, "args": vars(args), "runs": runs, "target step ≥ 2× met": met}
    name = "shared_prefix_smoke.json" if args.smoke else "shared_prefix.json"
    output = Path(args.output) if args.output else Path(__file__).parent / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output = write_results(output, results)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
