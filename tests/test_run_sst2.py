"""examples/run_sst2.py end to end on a tiny RoBERTa with the real tokenizer: the saved test accuracy must be
the accuracy of the saved model, recomputed here one sentence at a time without the package's prompting code."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, RobertaForMaskedLM, RobertaModel, TrainingArguments

from hf_mezo import MeZOConfig
from hf_mezo.data import load_sst2
from hf_mezo.prompting import Verbalizer

from .conftest import REPO, SHARED, hand_prompt_accuracy, import_run_sst2, tiny_roberta_config

TOKENIZER_DIR = str(SHARED / "tokenizers" / "roberta-base")

SCRIPT = REPO / "examples" / "run_sst2.py"
GREAT, TERRIBLE = 372, 6587
TEST_ROWS = 24


_import_script = import_run_sst2


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_mlm_dir):
    return tiny_mlm_dir


def _args(model_dir, output_dir, trainer):
    return [
        f"--model_name_or_path={model_dir}",
        f"--trainer={trainer}",
        "--k=16",
        "--data_seed=42",
        "--template=*cls**sent_0*_It_was*mask*.*sep+*",
        "--label_words={'0':'terrible','1':'great'}",
        "--do_train",
        "--max_steps=3",
        "--per_device_train_batch_size=8",
        "--learning_rate=1e-3",
        "--lr_scheduler_type=constant",
        "--logging_steps=1",
        "--save_strategy=no",
        f"--max_test_samples={TEST_ROWS}",
        "--per_device_eval_batch_size=8",
        "--report_to=none",
        "--seed=0",
        f"--output_dir={output_dir}",
    ]


def _hand_accuracy(model_dir, rows=TEST_ROWS):
    """Accuracy of the saved model on the first test rows: whole-prompt tokenization, one sentence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    assert tokenizer.convert_tokens_to_ids(["Ġgreat", "Ġterrible"]) == [GREAT, TERRIBLE]
    return hand_prompt_accuracy(model, tokenizer, load_sst2(k=16, seed=42)["test"].select(range(rows)))


def _check_run(model_dir, output_dir):
    metrics = json.loads((output_dir / "test_results.json").read_text())
    assert metrics["test_samples"] == TEST_ROWS
    assert metrics["test_accuracy"] == pytest.approx(_hand_accuracy(output_dir), abs=1e-12)
    assert 0.0 <= metrics["test_f1"] <= 1.0 and metrics["test_loss"] > 0
    losses = [
        entry["loss"]
        for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(losses) == 3
    trained = AutoModelForMaskedLM.from_pretrained(output_dir).state_dict()
    initial = AutoModelForMaskedLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(trained[name], initial[name]) for name in initial), (
        "training left the weights unchanged"
    )
    return metrics


def test_mezo_run_under_python(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "mezo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *_args(tiny_model_dir, output_dir, "mezo")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _check_run(tiny_model_dir, output_dir)
    assert "test_accuracy" in result.stdout  # printed as well as saved
    assert f"{metrics['test_accuracy']:.4f}".rstrip("0").rstrip(".") in result.stdout


def test_ft_run_with_stock_trainer(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "ft"
    metrics = _import_script().main(_args(tiny_model_dir, output_dir, "ft"))
    assert metrics == pytest.approx(json.loads((output_dir / "test_results.json").read_text()))
    _check_run(tiny_model_dir, output_dir)


@pytest.mark.distributed
def test_two_process_evaluation_gathers_every_test_row_once(tiny_model_dir, tmp_path):
    """21 rows over 2 processes × batches of 8: gather_for_metrics must drop the padding duplicates."""
    output_dir = tmp_path / "ddp"
    args = [a for a in _args(tiny_model_dir, output_dir, "ft") if a != "--do_train"]
    args = [a.replace(f"={TEST_ROWS}", "=21") for a in args] + ["--use_cpu", "--ddp_backend=gloo"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "test_results.json").read_text())
    assert metrics["test_samples"] == 21
    assert metrics["test_accuracy"] == pytest.approx(_hand_accuracy(tiny_model_dir, rows=21), abs=1e-12)


def test_help_documents_the_paper_hyper_parameters(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _import_script().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "accelerate launch --config_file accelerate_configs/multi_gpu.yaml examples/run_sst2.py" in text
    for setting in ("--per_device_train_batch_size 64", "--learning_rate 1e-6", "--zo_eps 1e-3", "--max_steps 100000"):
        assert setting in text
    assert "--lr_scheduler_type constant" in text and "--eval_steps 10000" in text
    assert "--trainer {mezo,ft}" in text
    # The multi-process command keeps the paper's global batch of 64: 8 per device on multi_gpu.yaml's 8 processes.
    launch = text[text.index("accelerate launch --config_file accelerate_configs/multi_gpu.yaml") :]
    assert "--per_device_train_batch_size 8" in launch.split("\n\n")[0]
    assert "num_processes: 8" in (REPO / "accelerate_configs" / "multi_gpu.yaml").read_text()


def test_ft_parses_the_stock_training_arguments():
    # Before the fix, --trainer ft parsed MeZOConfig: max_grad_norm 0 (no clipping for the backprop baseline), and
    # --max_grad_norm/--optim/--fp16 were refused with MeZO's messages.
    script = _import_script()
    common = ["--output_dir", "unused", "--use_cpu"]
    _, _, ft = script.parse_args(["--trainer", "ft", *common])
    assert (
        type(ft).__mro__[1] is TrainingArguments and ft.max_grad_norm == 1.0 and ft.optim.value == "adamw_torch_fused"
    )
    _, _, ft = script.parse_args(["--trainer", "ft", *common, "--max_grad_norm", "0.5", "--optim", "adafactor"])
    assert (ft.max_grad_norm, ft.optim.value) == (0.5, "adafactor")
    _, _, ft = script.parse_args(["--trainer", "ft", *common, "--zo_train_top_layers", "1"])
    assert ft.zo_train_top_layers == 1
    with pytest.raises(ValueError, match="--zo_eps"):  # a MeZO-only flag is not silently ignored
        script.parse_args(["--trainer", "ft", *common, "--zo_eps", "1e-3"])
    _, _, mezo = script.parse_args(["--trainer", "mezo", *common])
    assert isinstance(mezo, MeZOConfig) and mezo.max_grad_norm == 0.0


def test_checkpoint_without_mlm_head_gets_a_new_head_with_a_warning(tmp_path, caplog):
    from hf_mezo.models import RobertaForPromptMaskedLM

    torch.manual_seed(0)
    RobertaModel(tiny_roberta_config(vocab_size=50265), add_pooling_layer=False).save_pretrained(tmp_path)
    script = _import_script()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    verbalizer = Verbalizer("{'0':'terrible','1':'great'}", tokenizer)
    with caplog.at_level(logging.WARNING, logger="run_sst2"):
        stock = script.load_model(
            script.ModelArguments(model_name_or_path=str(tmp_path), label_word_head=False), verbalizer, tokenizer
        )
    assert type(stock) is RobertaForMaskedLM
    assert any("freshly initialized" in r.getMessage() and "lm_head" in r.getMessage() for r in caplog.records)
    assert not script.is_label_word_model(stock)  # a stock MLM: the collator must not send class_labels

    prompt = script.load_model(script.ModelArguments(model_name_or_path=str(tmp_path)), verbalizer, tokenizer)
    assert isinstance(prompt, RobertaForPromptMaskedLM) and script.is_label_word_model(prompt)
    assert list(prompt.config.label_word_ids) == [6587, 372]
    # Same weights, same predictions: the label-word logits are the stock logits at the label ids.
    prompt.load_state_dict(stock.state_dict())
    ids = tokenizer(["A fine film . It was <mask> ."], return_tensors="pt")
    mask = int((ids["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    with torch.no_grad():
        full = stock.eval()(**ids).logits[0, mask, [6587, 372]]
        classes = prompt.eval()(**ids).logits[0]
    torch.testing.assert_close(classes, full, rtol=1e-5, atol=1e-6)


def test_public_api_is_exported():
    import hf_mezo
    from hf_mezo import data, metrics, prompting

    assert hf_mezo.PromptTemplate is prompting.PromptTemplate and hf_mezo.Verbalizer is prompting.Verbalizer
    assert hf_mezo.VerbalizerDataCollator is prompting.VerbalizerDataCollator
    assert hf_mezo.load_sst2 is data.load_sst2 and hf_mezo.build_compute_metrics is metrics.build_compute_metrics
    assert {"PromptTemplate", "Verbalizer", "VerbalizerDataCollator", "load_sst2", "build_compute_metrics"} <= set(
        hf_mezo.__all__
    )
