"""examples/demo.py end to end on a tiny Llama built from a config (no download): every number it reports is
recomputed here with the stock `LlamaForCausalLM`, one whole prompt at a time, from the weights each method left."""

import json
import shutil
import sys

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from transformers import LlamaConfig, LlamaForCausalLM

from hf_mezo import LlamaForPromptCausalLM
from hf_mezo.data import SHIPPED_KSHOT_DIR, load_sst2

from .conftest import REPO
from .test_prompting_causal import GREAT, TERRIBLE, TINY_CAUSAL, gpt2_style_tokenizer

sys.path.insert(0, str(REPO / "examples"))
import demo  # noqa: E402

FORWARDS = 10  # mezo: 5 steps of 2 forwards; fzoo: 2 steps of 5 (4 one-sided probes + the unperturbed pass)
ADAMW_STEPS = 4
TEST_ROWS = 48


def small_split(root):
    """The shipped 16-42 split with its test file cut to TEST_ROWS sentences, as a --data_dir."""
    source = SHIPPED_KSHOT_DIR / "16-42"
    target = root / "SST-2" / "16-42"
    target.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(source / name, target / name)
    lines = (source / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (target / "test.tsv").write_text("".join(lines[: TEST_ROWS + 1]), encoding="utf-8")
    return root


def tiny_config():
    return LlamaConfig(**{**TINY_CAUSAL, "num_hidden_layers": 3})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForPromptCausalLM(tiny_config())
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)  # a non-trivial final norm, so a missed norm shows
    pretrained = {name: t.detach().clone() for name, t in model.state_dict().items()}
    output_dir = tmp_path_factory.mktemp("demo")
    data_dir = small_split(tmp_path_factory.mktemp("data"))
    args = demo.parse_args(
        [
            "--k=16",
            f"--data_dir={data_dir}",
            f"--output_dir={output_dir}",
            "--methods",
            "mezo",
            "fzoo",
            f"--forwards={FORWARDS}",
            f"--adamw_steps={ADAMW_STEPS}",
            "--batch_size=8",
            "--learning_rate",
            "mezo=1e-2",
            "fzoo=1e-2",
            "adamw=1e-2",
            "--curve_points=2",
            "--curve_examples=16",
        ]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo.TestCurve, "__init__", _recording_curve_rows(demo.TestCurve.__init__))
        results = demo.run(args, demo.prompt_setup(model, gpt2_style_tokenizer(padding_side="left")))
    return model, pretrained, results, output_dir, data_dir


CURVE_BATCH_ROWS: list[int] = []  # rows of every batch a run's test curve forwards (filled by demo_run)


def _recording_curve_rows(init):
    def recording_init(self, batches, every, forwards):
        CURVE_BATCH_ROWS.extend(len(batch["labels"]) for batch in batches)
        init(self, batches, every, forwards)

    return recording_init


def stock_model(pretrained, trained=None):
    """A stock LlamaForCausalLM holding the pretrained weights, with the trained tensors (if any) put in."""
    model = LlamaForCausalLM(tiny_config()).eval()
    model.load_state_dict(pretrained, strict=False)  # the prompt LM's names are the stock class's
    if trained:
        missing = set(trained) - set(dict(model.named_parameters()))
        assert not missing, missing
        model.load_state_dict(trained, strict=False)
    return model


def prompt_ids(tokenizer, sentence):
    return torch.tensor([tokenizer(sentence.strip() + " It was")["input_ids"]])


@torch.no_grad()
def hand_accuracy(model, tokenizer, rows) -> float:
    correct = 0
    for row in rows:
        logits = model(input_ids=prompt_ids(tokenizer, row["sentence"]), logits_to_keep=1).logits[0, -1]
        correct += int(int(logits[GREAT] > logits[TERRIBLE]) == row["label"])
    return correct / len(rows)


@torch.no_grad()
def hand_states(model, tokenizer, rows) -> torch.Tensor:
    """The final norm's output at each prompt's last token (the stock model's last hidden state)."""
    return torch.stack(
        [
            model(
                input_ids=prompt_ids(tokenizer, row["sentence"]), output_hidden_states=True, logits_to_keep=1
            ).hidden_states[-1][0, -1]
            for row in rows
        ]
    )


@pytest.mark.slow  # ≈ 25 s quiet, 60 s with the 2 cores shared
def test_demo_reports_what_the_stock_model_computes(demo_run):
    model, pretrained, results, output_dir, data_dir = demo_run
    tokenizer = gpt2_style_tokenizer()
    data = load_sst2(16, 42, data_dir)
    assert len(data["test"]) == TEST_ROWS
    saved = json.loads((output_dir / "results.json").read_text())
    assert set(saved) >= {"zero_shot", "linear_probe", "inference", "mezo", "fzoo", "adamw"}
    assert (output_dir / "curves.png").is_file()

    assert saved["zero_shot"]["test_accuracy"] == pytest.approx(
        hand_accuracy(stock_model(pretrained), tokenizer, data["test"])
    )
    stock = stock_model(pretrained)
    probe = LogisticRegression(C=demo.LINEAR_PROBE_C, max_iter=5000).fit(
        hand_states(stock, tokenizer, data["train"]).numpy(), data["train"]["label"]
    )
    expected_probe = probe.score(hand_states(stock, tokenizer, data["test"]).numpy(), data["test"]["label"])
    assert saved["linear_probe"]["test_accuracy"] == pytest.approx(expected_probe, abs=1.5 / len(data["test"]))

    for method, steps, forwards in (("mezo", 5, FORWARDS), ("fzoo", 2, FORWARDS), ("adamw", ADAMW_STEPS, ADAMW_STEPS)):
        run = saved[method]
        assert (run["steps"], run["forward_passes"]) == (steps, forwards)
        assert run["curve"][0][:2] == [0, 0] and run["curve"][-1][:2] == [steps, forwards]
        assert run["peak_mib"] >= 0 and run["wall_s"] > 0
        trained = results["trained"][method]
        # The trainable set: the top layer and the final norm, nothing else.
        assert set(trained) == {
            n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.norm."))
        }
        assert any(not torch.equal(trained[n], pretrained[n]) for n in trained), f"{method} changed nothing"
        expected = hand_accuracy(stock_model(pretrained, trained), tokenizer, data["test"])
        assert run["test_accuracy"] == pytest.approx(expected)

    # Each method started from the pretrained model, and the model is left as it was loaded.
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    # The frozen layers ran once per example: every later pass was served by the depth cache.
    cache = model.depth_cache
    assert 0 < cache.misses <= len(data["train"]) + len(data["test"]) < cache.hits


def test_curve_evaluations_do_not_set_the_runs_peak_memory(demo_run):
    """The curve points are forwarded inside each run's memory window: in batches of at most the training batch
    (8 here), an evaluation costs what a training forward costs. Larger ones (64 rows, as the final evaluation
    uses) made an evaluation, not training, set MeZO's reported peak on SmolLM2."""
    assert CURVE_BATCH_ROWS, "no run recorded a test curve"
    assert max(CURVE_BATCH_ROWS) <= 8
    assert sum(CURVE_BATCH_ROWS) == 16 * 3  # --curve_examples 16, for mezo, fzoo and adamw
