"""Seed log: bytes per step, and replay time against training time.

Two runs, each trained by `MeZOTrainer` with `zo_seed_log=True`, then replayed onto a copy of the base
weights with `hf_mezo.replay_seed_log` (bit-identity checked):

  smollm2   the embedded SmolLM2-135M-Instruct (GGUF, float32) as `LlamaForPromptCausalLM`, SST-2 k = 512
            (shipped split 512-42) prompts "{sentence} It was" → " terrible"/" great", the top layer trainable
            through the depth cache, batch 16, `--steps` steps per method (mezo and lozo)
  large     a randomly initialised roberta-large-shaped `RobertaForMaskedLM` (355M parameters, all
            trainable), random 16×64 MLM batches, 3 steps: the log's size is what any run of that model
            writes per step, and the replay time per step is the update alone

    python benchmarks/seed_log.py                 # both, writes benchmarks/results/seed_log.json
    python benchmarks/seed_log.py --skip-large --steps 50

Prints a table; the JSON records the commit and the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import run_record  # noqa: E402  (commit + machine, one implementation)

from hf_mezo import MeZOConfig, MeZOTrainer, load_seed_log, replay_seed_log  # noqa: E402


def measure(model, dataset, collator, out: str, method: str, steps: int, **config) -> dict:
    base = copy.deepcopy(model)
    args = MeZOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=config.pop("lr", 1e-6),
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        logging_steps=max(1, steps), zo_seed_log=True, zo_method=method, remove_unused_columns=False, **config,
    )  # fmt: skip
    trainer = MeZOTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    log = Path(out) / "seed_log.json"
    header, records = load_seed_log(log)
    header_bytes = len(json.dumps(header, separators=(",", ":")))
    start = time.perf_counter()
    replay_seed_log(base, log)
    replay_s = time.perf_counter() - start
    names = [p["name"] for p in header["parameters"]]
    trained, replayed = dict(model.named_parameters()), dict(base.named_parameters())
    identical = all(torch.equal(trained[n], replayed[n]) for n in names)
    size = log.stat().st_size
    return {
        "method": method,
        "steps": len(records),
        "log_bytes": size,
        "header_bytes": header_bytes,
        "bytes_per_step": (size - header_bytes) / len(records),
        "trainable_parameters": sum(trained[n].numel() for n in names),
        "trainable_bytes": sum(trained[n].numel() * trained[n].element_size() for n in names),
        "train_s": train_s,
        "replay_s": replay_s,
        "replay_over_train": replay_s / train_s,
        "bit_identical": identical,
    }


def smollm2_rows(steps: int, out: str) -> list[dict]:
    from hf_mezo import CausalPromptTemplate, Verbalizer, VerbalizerDataCollator, load_sst2
    from hf_mezo.models import LlamaForPromptCausalLM
    from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path

    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    verbalizer = Verbalizer({0: "terrible", 1: "great"}, tokenizer)
    collator = VerbalizerDataCollator(
        tokenizer, CausalPromptTemplate("{sentence} It was"), verbalizer, causal=True, return_class_labels=True
    )
    train = load_sst2(k=512, seed=42)["train"]
    rows = []
    for method, lr in (("mezo", 1e-5), ("lozo", 1e-5)):
        torch.manual_seed(0)
        model = load_gguf_model(smollm2_gguf_path(), LlamaForPromptCausalLM)
        model.set_label_word_ids(verbalizer.token_ids)
        row = measure(model, train, collator, f"{out}/smollm2-{method}", method, steps, lr=lr, zo_train_top_layers=1)
        rows.append({"run": "smollm2 top layer, SST-2 512-42", **row})
    return rows


def large_rows(out: str) -> list[dict]:
    from datasets import Dataset
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, hidden_size=1024,
                           num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)  # fmt: skip
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50265, (48, 64), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 32] = ids[:, 32]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return [{"run": "roberta-large shape, all parameters", **measure(model, data, None, f"{out}/large", "mezo", 3)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="SmolLM2 steps per method")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "seed_log.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        if not args.skip_smollm2:
            rows += smollm2_rows(args.steps, out)
        if not args.skip_large:
            rows += large_rows(out)
    print(
        f"\n{'run':38}{'method':8}{'steps':>6}{'B/step':>8}{'header B':>10}{'train s':>9}{'replay s':>9}{'ratio':>7}  identical"
    )
    for r in rows:
        print(
            f"{r['run']:38}{r['method']:8}{r['steps']:>6}{r['bytes_per_step']:8.0f}{r['header_bytes']:>10}"
            f"{r['train_s']:9.1f}{r['replay_s']:9.2f}{r['replay_over_train']:7.3f}  {r['bit_identical']}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"run": run_record(), "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
