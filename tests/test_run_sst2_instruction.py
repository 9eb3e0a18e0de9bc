"""examples/run_sst2.py --instruction / --num_demonstrations on a tiny causal LM: the saved test accuracy equals the
saved model's accuracy recomputed with the stock class on the whole prompt written by hand, and --no_share_prefix
gives the same metrics."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hf_mezo.data import load_sst2
from hf_mezo.prompting.demonstrations import select_demonstrations

from .conftest import import_run_sst2
from .test_prompting_causal import GREAT, TERRIBLE
from .test_run_sst2_causal import TEST_ROWS, _args, tiny_causal_dir  # noqa: F401  (a fixture)

INSTRUCTION = "Classify the sentiment of the movie review as great or terrible."


def _hand_accuracy(model, tokenizer, context):
    correct = 0
    with torch.no_grad():
        for row in load_sst2(k=16, seed=42)["test"].select(range(TEST_ROWS)):
            ids = torch.tensor([tokenizer(context + row["sentence"].strip() + " It was")["input_ids"]])
            logits = model(input_ids=ids).logits[0, -1]
            correct += int(int(logits[GREAT] > logits[TERRIBLE]) == row["label"])
    return correct / TEST_ROWS


def test_instruction_and_demonstrations_run(tiny_causal_dir, tmp_path):  # noqa: F811
    extra = ["--trainer=mezo", "--zo_train_top_layers=1", f"--instruction={INSTRUCTION}", "--num_demonstrations=2"]
    shared_dir, unshared_dir = tmp_path / "shared", tmp_path / "unshared"
    metrics = import_run_sst2().main(_args(tiny_causal_dir, shared_dir, *extra))
    unshared = import_run_sst2().main(_args(tiny_causal_dir, unshared_dir, *extra, "--no_share_prefix"))
    assert metrics["test_accuracy"] == unshared["test_accuracy"]
    assert metrics["test_loss"] == pytest.approx(unshared["test_loss"], rel=1e-5)
    saved = json.loads((shared_dir / "test_results.json").read_text())
    demos = select_demonstrations(load_sst2(k=16, seed=42)["train"], 2, seed=42)
    words = {0: "terrible", 1: "great"}
    context = INSTRUCTION + "\n\n" + "".join(f"{s.strip()} It was {words[y]}\n\n" for s, y in demos)
    trained = LlamaForCausalLM.from_pretrained(shared_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(shared_dir)
    assert saved["test_accuracy"] == pytest.approx(_hand_accuracy(trained, tokenizer, context))
