"""Shared fixtures: tiny models built from configs (never the hub), the real roberta-base tokenizer."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_roberta_config(**overrides):
    from transformers import RobertaConfig

    kwargs = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return RobertaConfig(**kwargs)


@pytest.fixture
def tiny_config():
    return tiny_roberta_config()


def mezo_args(tmp_path, **overrides):
    """A `MeZOConfig` for quick CPU tests: constant LR, log every step, no saving, no reporting."""
    from hf_mezo import MeZOConfig

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return MeZOConfig(**kwargs)


def classification_dataset(n=16, length=6, seed=0):
    """Random token rows (bos … eos) whose label is the parity of their first token."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 2).tolist()})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def import_run_sst2():
    """examples/run_sst2.py as a module (registered in sys.modules: its dataclasses need that)."""
    import importlib.util
    import sys

    if "run_sst2" not in sys.modules:
        spec = importlib.util.spec_from_file_location("run_sst2", REPO / "examples" / "run_sst2.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["run_sst2"] = module
        spec.loader.exec_module(module)
    return sys.modules["run_sst2"]


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory):
    """A random tiny RobertaForMaskedLM (full roberta-base vocabulary, hidden 16) with the real tokenizer beside it."""
    import shutil

    from transformers import RobertaForMaskedLM

    path = tmp_path_factory.mktemp("tiny-roberta-mlm")
    torch.manual_seed(0)
    RobertaForMaskedLM(tiny_roberta_config(vocab_size=50265, max_position_embeddings=130)).save_pretrained(path)
    tokenizer_dir = SHARED / "tokenizers" / "roberta-base"
    for name in os.listdir(tokenizer_dir):
        if name.endswith((".json", ".txt")):
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def hand_prompt_accuracy(model, tokenizer, rows) -> float:
    """Accuracy of a masked LM on SST-2 rows, independently of hf_mezo's prompting: whole-prompt tokenization,
    one sentence at a time, ' great' vs ' terrible' logits at the mask."""
    great, terrible = (tokenizer.convert_tokens_to_ids(w) for w in ("Ġgreat", "Ġterrible"))
    correct = 0
    with torch.no_grad():
        for row in rows:
            encoded = tokenizer(row["sentence"].strip() + " It was<mask>.", return_tensors="pt")
            position = encoded["input_ids"][0].tolist().index(tokenizer.mask_token_id)
            logits = model(**encoded).logits[0, position]
            correct += int(int(logits[great] > logits[terrible]) == row["label"])
    return correct / len(rows)
