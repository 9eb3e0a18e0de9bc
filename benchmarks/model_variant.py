"""Forward and MeZO step time: stock masked / causal LM vs the label-word head vs the head + depth cache.

On randomly initialized roberta-base-, roberta-large- and SmolLM2-135M-shaped models (`--shapes smollm2`: a
`LlamaConfig` with 30 layers, hidden 576, 9 heads / 3 KV heads, intermediate 1536, vocabulary 49,152, tied
embeddings; stock `LlamaForCausalLM` vs `LlamaForPromptCausalLM`, scored at the last token) and one batch of
prompts (one mask per example, or the last token for a causal LM; two label words as in SST-2), times

  forward (no grad, with labels, so the loss is included)
    stock          `RobertaForMaskedLM`: full-vocabulary logits at every position, MLM loss
    label words    `RobertaForPromptMaskedLM` with label words: class logits at the mask, LM-BFF loss
    label + cache  the same with the top 25% of the layers trainable and the depth cache warm
  MeZO step (two perturbed forwards + the update, as `MeZOTrainer` takes it)
    reference      the reference algorithm (princeton-nlp/MeZO, re-implemented from its description in
                   benchmarks/step_time.py): stock model, all parameters, in-place perturbation
    stock full     hf_mezo's step (`ZerothOrderSGD` + `perturbed_forward`), stock model, all parameters
    stock top      hf_mezo's step, stock model, top 25% of the layers + head trainable
    label top      hf_mezo's step, label-word head, top 25% trainable, no cache
    label+cache    the same with the depth cache, warm (every example seen before: the few-shot regime)
    (cold)         the first step with the cache, which fills it

and the depth cache's memory per example. Targets (issue 4, on the 2-core CPU): label-word forward ≥ 1.5×
faster than stock; top-25% step with cache ≥ 3× faster than without; and ≥ 2.5× faster than the reference.

`--generic` compares instead the family classes (`RobertaForPromptMaskedLM`, `LlamaForPromptCausalLM`) with the
generic `AutoModelForPromptMaskedLM` / `AutoModelForPromptCausalLM` on the same weights and batch, timed in
alternation: the label-word forward (no cache), the MeZO step with the top 25% trainable and the depth cache warm,
and (causal) the forward and step (top 25%, depth cache off) on rows whose first 3/4 are a common prefix, shared.
Target (issue 20): the generic path within 10% of the family class (ratio generic / family ≤ 1.10).

    python benchmarks/model_variant.py                                 # base + large, batch 16×64
    python benchmarks/model_variant.py --batch_sizes 16 64             # and the MeZO paper's batch 64
    python benchmarks/model_variant.py --shapes base --repeats 5
    python benchmarks/model_variant.py --shapes smollm2 --output benchmarks/results/model_variant_smollm2.json
    python benchmarks/model_variant.py --smoke                         # tiny shapes: checks that it runs
    python benchmarks/model_variant.py --generic                       # roberta-base, SmolLM2: family vs generic

Prints a table and writes benchmarks/results/model_variant.json (model_variant_smoke.json for --smoke).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM

from hf_mezo import AutoModelForPromptCausalLM, AutoModelForPromptMaskedLM, ZerothOrderSGD, perturbed_forward
from hf_mezo.models import LlamaForPromptCausalLM, RobertaForPromptMaskedLM, freeze_all_but_top_layers

sys.path.insert(0, str(Path(__file__).parent))
from step_time import ReferenceMeZO  # noqa: E402  (one reference implementation for all benchmarks)

SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64),
}
# Decoder-only shapes (LlamaConfig): SmolLM2-135M's, and a tiny one for --smoke.
CAUSAL_SHAPES = {
    "smollm2": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    ),
    "causal-tiny": dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    ),
}
SHAPES.update(CAUSAL_SHAPES)
VOCAB_SIZE = 50265
LABEL_WORDS = [6587, 372]  # " terrible", " great" in the roberta-base vocabulary (LM-BFF's SST-2 verbalizer)
CAUSAL_VOCAB_SIZE = 49152
CAUSAL_LABEL_WORDS = [13321, 1109]  # " terrible", " great" in SmolLM2's vocabulary


@dataclass
class BenchmarkArguments:
    shapes: list[str] = field(
        default_factory=lambda: ["base", "large"], metadata={"help": "Model shapes: base, large."}
    )
    batch_sizes: list[int] = field(default_factory=lambda: [16], metadata={"help": "Batch sizes (the paper: 64)."})
    seq_len: int = field(default=64, metadata={"help": "Tokens per example (all attended, mask mid-sequence)."})
    top_fraction: float = field(default=0.25, metadata={"help": "Fraction of the encoder layers to train."})
    repeats: int = field(default=3, metadata={"help": "Timed runs per measurement (median reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed runs before each measurement."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    smoke: bool = field(default=False, metadata={"help": "Tiny shapes, batch 4×16, one repeat: checks it runs."})
    generic: bool = field(
        default=False, metadata={"help": "Family classes vs the generic Auto classes (default shapes base, smollm2)."}
    )
    output: str | None = field(default=None, metadata={"help": "JSON path (default benchmarks/results/...)."})


def label_words(vocab_size: int, causal: bool = False) -> list[int]:
    words = CAUSAL_LABEL_WORDS if causal else LABEL_WORDS
    return [word % vocab_size for word in words]  # the smoke run's vocabulary is smaller


def make_batch(batch_size: int, seq_len: int, vocab_size: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    labels[:, seq_len // 2] = torch.tensor(label_words(vocab_size))[torch.arange(batch_size) % 2]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def make_causal_batches(batch_size: int, seq_len: int, vocab_size: int, device: str):
    """(stock batch, prompt batch) of the same prompts. The stock causal LM gets causal-LM labels marking the
    label word as the last token's target (full-vocabulary logits at every position, then the loss); the prompt
    model gets what `VerbalizerDataCollator(causal=True)` gives it: the class index per row."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    classes = torch.arange(batch_size) % 2
    stock_labels = torch.full_like(ids, -100)
    stock_labels[:, -1] = torch.tensor(label_words(vocab_size, causal=True))[classes]
    mask = torch.ones_like(ids)
    stock_batch = {"input_ids": ids, "attention_mask": mask, "labels": stock_labels}
    prompt_batch = {"input_ids": ids, "attention_mask": mask, "labels": classes}
    return tuple({k: v.to(device) for k, v in b.items()} for b in (stock_batch, prompt_batch))


def build_models(shape: str, vocab_size: int, device: str):
    """A stock and a prompt model with the same random weights."""
    torch.manual_seed(0)
    if shape in CAUSAL_SHAPES:
        config = LlamaConfig(
            vocab_size=vocab_size, max_position_embeddings=2048, tie_word_embeddings=True, **SHAPES[shape]
        )
        stock = LlamaForCausalLM(config).eval().to(device)
        prompt = LlamaForPromptCausalLM(config, label_word_ids=label_words(vocab_size, causal=True))
    else:
        config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=514, type_vocab_size=1, **SHAPES[shape])
        stock = RobertaForMaskedLM(config).eval().to(device)
        prompt = RobertaForPromptMaskedLM(config, label_word_ids=label_words(vocab_size))
    prompt.load_state_dict(stock.state_dict())
    return stock, prompt.eval().to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, args: BenchmarkArguments) -> float:
    """Median seconds of `fn` over `repeats` runs, after `warmup` runs."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        fn()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_together(fns: dict, args: BenchmarkArguments) -> dict[str, float]:
    """Median seconds of each function, timed in alternation (A B A B ...), so that a change in the machine's
    load during the measurement (other jobs on a shared machine) weighs on both sides of a ratio alike."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            synchronize(args.device)
            start = time.perf_counter()
            fn()
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def mezo_step(model, optimizer: ZerothOrderSGD, batch) -> None:
    """One MeZO step as `MeZOTrainer` takes it: L₊, L₋, g = (L₊ − L₋)/2ε accumulated, then the update."""
    losses = []
    for scale in (optimizer.eps, -optimizer.eps):
        with perturbed_forward(model, optimizer, 0, scale):
            losses.append(model(**batch).loss)
    optimizer.accumulate(0, (losses[0] - losses[1]) / (2 * optimizer.eps))
    optimizer.step()


def trainable_optimizer(model) -> ZerothOrderSGD:
    return ZerothOrderSGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-6)


def measure(shape: str, batch_size: int, args: BenchmarkArguments, vocab_size: int, seq_len: int) -> dict:
    causal = shape in CAUSAL_SHAPES
    if causal:
        vocab_size = CAUSAL_VOCAB_SIZE if vocab_size == VOCAB_SIZE else vocab_size
    stock, prompt = build_models(shape, vocab_size, args.device)
    if causal:
        stock_batch, batch = make_causal_batches(batch_size, seq_len, vocab_size, args.device)
    else:
        stock_batch = batch = make_batch(batch_size, seq_len, vocab_size, args.device)
    layers = SHAPES[shape]["num_hidden_layers"]
    top = max(1, round(args.top_fraction * layers))
    times = {}

    with torch.no_grad():
        prompt.depth_cache.resize(0)
        forwards = {"forward stock": lambda: stock(**stock_batch), "forward label words": lambda: prompt(**batch)}
        times.update(timed_together(forwards, args))

    # All parameters trainable: the paper's setting, reference and hf_mezo steps on the stock model.
    times["step reference (all params)"] = timed(lambda: ReferenceMeZO(stock).step(stock_batch), args)
    optimizer = trainable_optimizer(stock)
    times["step stock (all params)"] = timed(lambda: mezo_step(stock, optimizer, stock_batch), args)

    freeze_all_but_top_layers(stock, top)
    optimizer = trainable_optimizer(stock)
    times["step stock (top)"] = timed(lambda: mezo_step(stock, optimizer, stock_batch), args)

    freeze_all_but_top_layers(prompt, top)
    uncached = copy.deepcopy(prompt)  # the same model without the cache, timed in alternation with the cached one
    uncached_optimizer = trainable_optimizer(uncached)
    optimizer = trainable_optimizer(prompt)
    prompt.depth_cache.resize(1 << 34)
    synchronize(args.device)
    start = time.perf_counter()
    mezo_step(prompt, optimizer, batch)  # cold: fills the cache
    synchronize(args.device)
    times["step label words + cache (top), cold"] = time.perf_counter() - start
    steps = {
        "step label words (top)": lambda: mezo_step(uncached, uncached_optimizer, batch),
        "step label words + cache (top)": lambda: mezo_step(prompt, optimizer, batch),
    }
    times.update(timed_together(steps, args))
    steps = uncached = uncached_optimizer = None  # free the copy before the next measurements
    with torch.no_grad():
        times["forward label words + cache (top)"] = timed(lambda: prompt(**batch), args)

    cache = prompt.depth_cache
    ratios = {
        "forward: stock / label words": times["forward stock"] / times["forward label words"],
        "forward: stock / label words + cache": times["forward stock"] / times["forward label words + cache (top)"],
        "step: label words no cache / cache (top)": times["step label words (top)"]
        / times["step label words + cache (top)"],
        "step: stock top / label words + cache": times["step stock (top)"] / times["step label words + cache (top)"],
        "step: reference / label words + cache": times["step reference (all params)"]
        / times["step label words + cache (top)"],
    }
    return {
        "shape": shape,
        "model": "LlamaForCausalLM vs LlamaForPromptCausalLM" if causal else "RobertaForMaskedLM vs prompt",
        "batch": [batch_size, seq_len],
        "trainable_layers": f"top {top} of {layers}",
        "parameters": sum(p.numel() for p in stock.parameters()),
        "seconds": times,
        "ratios": ratios,
        "targets_met": {
            "label-word forward >= 1.5x stock": ratios["forward: stock / label words"] >= 1.5,
            "cache step >= 3x no-cache step": ratios["step: label words no cache / cache (top)"] >= 3,
            "cache step >= 2.5x reference step": ratios["step: reference / label words + cache"] >= 2.5,
        },
        "cache": {
            "examples": len(cache),
            "bytes_per_example": cache.bytes_per_example(),
            "frozen_layers": prompt.frozen_depth(),
            "hits": cache.hits,
            "misses": cache.misses,
        },
    }


def measure_generic(shape: str, batch_size: int, args: BenchmarkArguments, vocab_size: int, seq_len: int) -> dict:
    """Family class vs generic class on the same weights: forward, cached step, shared-prefix forward and step."""
    causal = shape in CAUSAL_SHAPES
    if causal:
        vocab_size = CAUSAL_VOCAB_SIZE if vocab_size == VOCAB_SIZE else vocab_size
    stock, family = build_models(shape, vocab_size, args.device)
    if causal:
        generic = AutoModelForPromptCausalLM.from_model(stock, label_word_ids=label_words(vocab_size, causal=True))
        _, batch = make_causal_batches(batch_size, seq_len, vocab_size, args.device)
    else:
        generic = AutoModelForPromptMaskedLM.from_model(stock, label_word_ids=label_words(vocab_size))
        batch = make_batch(batch_size, seq_len, vocab_size, args.device)
    models = {"family": family, "generic": generic}
    layers = SHAPES[shape]["num_hidden_layers"]
    top = max(1, round(args.top_fraction * layers))
    times, deltas = {}, {}

    def compare(label: str, make_fn) -> None:
        measured = timed_together({f"{label}: {name}": make_fn(name, model) for name, model in models.items()}, args)
        times.update(measured)

    def class_logits_delta(label: str, inputs) -> None:
        with torch.no_grad():
            logits = [model(**inputs).logits for model in models.values()]
        deltas[label] = float((logits[0] - logits[1]).abs().max())

    for model in models.values():
        model.depth_cache.resize(0)
        if causal:
            model.share_prefix = False
    class_logits_delta("forward", batch)
    with torch.no_grad():
        compare("forward", lambda name, model: lambda: model(**batch))

    optimizers = {}
    for name, model in models.items():
        freeze_all_but_top_layers(model, top)
        model.depth_cache.resize(1 << 34)
        optimizers[name] = trainable_optimizer(model)
        mezo_step(model, optimizers[name], batch)  # cold: fills the cache
    class_logits_delta("cached", batch)
    compare(
        "step + cache (top)",
        lambda name, model: lambda: mezo_step(model, optimizers[name], batch),
    )

    if causal:
        shared_batch = {k: v.clone() for k, v in batch.items()}
        shared_batch["input_ids"][:, : seq_len * 3 // 4] = shared_batch["input_ids"][0, : seq_len * 3 // 4]
        for model in models.values():
            model.depth_cache.resize(0)
            model.share_prefix = True
            model.reset_shared_prefix_stats()
        class_logits_delta("shared prefix", shared_batch)
        assert all(model.shared_prefix_stats["shared_layer_runs"] == 1 for model in models.values())
        with torch.no_grad():
            compare("forward shared prefix", lambda name, model: lambda: model(**shared_batch))
        compare(
            "step shared prefix (top)", lambda name, model: lambda: mezo_step(model, optimizers[name], shared_batch)
        )
    ratios = {
        f"{label}: generic / family": times[f"{label}: generic"] / times[f"{label}: family"]
        for label in dict.fromkeys(key.rsplit(": ", 1)[0] for key in times)
    }
    return {
        "shape": shape,
        "model": f"{type(family).__name__} vs {type(generic).__name__}",
        "batch": [batch_size, seq_len],
        "trainable_layers": f"top {top} of {layers}",
        "parameters": sum(p.numel() for p in generic.parameters()),
        "seconds": times,
        "ratios": ratios,
        "max |Δ class logits| family vs generic": deltas,
        "targets_met": {"generic within 10% of the family class": all(r <= 1.10 for r in ratios.values())},
    }


def print_generic_result(result: dict) -> None:
    batch = result["batch"]
    print(f"\n{result['model']} ({result['parameters'] / 1e6:.1f}M params), batch {batch[0]}×{batch[1]}")
    print(f"{'':44}{'median s':>10}")
    for name, value in result["seconds"].items():
        print(f"{name:44}{value:10.3f}")
    for name, value in result["ratios"].items():
        print(f"{name:44}{value:9.2f}×")
    for name, value in result["max |Δ class logits| family vs generic"].items():
        print(f"max |Δ class logits| {name:23}{value:10.1e}")


def print_result(result: dict) -> None:
    batch, seconds = result["batch"], result["seconds"]
    print(
        f"\n{result['shape']}-shaped {'Llama' if result['shape'] in CAUSAL_SHAPES else 'RoBERTa'} "
        f"({result['parameters'] / 1e6:.1f}M params), batch {batch[0]}×{batch[1]}, "
        f"'top' = {result['trainable_layers']} layers + head trainable"
    )
    print(f"{'':44}{'median s':>10}")
    for name, value in seconds.items():
        print(f"{name:44}{value:10.3f}")
    for name, value in result["ratios"].items():
        print(f"{name:44}{value:9.2f}×")
    for name, met in result["targets_met"].items():
        print(f"target {name:37}{'met' if met else 'NOT met':>10}")
    cache = result["cache"]
    print(
        f"depth cache: {cache['examples']} examples, {cache['bytes_per_example'] / 1024:.0f} KiB each "
        f"({cache['frozen_layers']} frozen layers cached)"
    )


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes, batch_sizes, seq_len, vocab_size = args.shapes, args.batch_sizes, args.seq_len, VOCAB_SIZE
    if args.generic and shapes == ["base", "large"]:
        shapes = ["base", "smollm2"]
    if args.smoke:
        shapes, batch_sizes, seq_len, vocab_size = ["tiny", "causal-tiny"], [4], 16, 1000
        args.repeats, args.warmup = 1, 1
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "runs": [],
    }
    print(results["machine"])
    for shape in shapes:
        for batch_size in batch_sizes:
            if args.generic:
                result = measure_generic(shape, batch_size, args, vocab_size, seq_len)
                print_generic_result(result)
            else:
                result = measure(shape, batch_size, args, vocab_size, seq_len)
                print_result(result)
            results["runs"].append(result)
    name = f"model_variant{'_generic' if args.generic else ''}{'_smoke' if args.smoke else ''}.json"
    output = Path(args.output) if args.output else Path(__file__).parent / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
