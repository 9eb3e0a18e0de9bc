"""A small "Table 18": SST-2 test accuracy of SmolLM2-135M-Instruct over k-shot splits, five methods, one trainable set.

The MeZO paper's Table 18 reports RoBERTa-large (and OPT-13B in Table 1) on SST-2 with k = 16 / 512 over five data
seeds. This is the same protocol on a far smaller, different model, on the head-only setup `make demo` used before issue 18: prompt
``"{sentence} It was"``, label words " terrible" / " great", the trainable set = final RMSNorm + the two label rows
(1,728 parameters) on hidden states cached once per example, test = the 872 GLUE dev sentences. Per (k, data seed):

- zero-shot: the pretrained head, no training;
- linear probe: logistic regression (C = 0.1) on the normed last-token hidden state;
- FT: AdamW on the trainable set (backprop);
- MeZO: plain MeZO (`MeZOTrainer`) on the trainable set;
- MeZO-LoRA: MeZO on LoRA (peft, r = 8, α = 16) of the label rows, the norm trained in full (`modules_to_save`).

Prints mean ± std over seeds of test accuracy, wall time and peak RSS above the run's start, and writes
``benchmarks/results/accuracy.json``. Splits other than the shipped 16-42 / 512-42 come from ``--data_dir`` (an
LM-BFF/MeZO ``k-shot-1k-test`` directory). The defaults fit ~30 min on 2 CPU cores; shrink with the flags:

    python benchmarks/accuracy.py --data_dir ../shared/data/sst2/k-shot-1k-test
    python benchmarks/accuracy.py --ks 16 --seeds 42 --mezo_steps 2000      # a quick look
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from demo import PeakRSS  # noqa: E402  (examples/demo.py)

from hf_mezo import MeZOConfig, MeZOTrainer  # noqa: E402
from hf_mezo.data import load_sst2, shipped_kshot_splits  # noqa: E402
from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

METHODS = ("zero_shot", "linear_probe", "ft", "mezo", "mezo_lora")
TEMPLATE = "{sentence} It was"
LABEL_WORDS = (" terrible", " great")
LINEAR_PROBE_C = 0.1

# ---- the head-only setting: a copy of the final norm and the label rows, on cached last-token states ----------
# (what `make demo` tuned before issue 18; the demo now tunes real layers through hf_mezo.models)


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


@torch.no_grad()
def last_token_states(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """The hidden state entering the final norm at each prompt's last token (n × hidden), right padding."""
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _, args: captured.__setitem__("h", args[0]))
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    states = torch.empty(len(sentences), model.config.hidden_size)
    try:
        for start in range(0, len(order), batch_size):
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 42, 87])
    parser.add_argument("--data_dir", default=None, help="k-shot-1k-test directory for splits not shipped")
    parser.add_argument("--mezo_steps", type=int, default=20000)
    parser.add_argument("--mezo_learning_rate", type=float, default=3e-3)
    parser.add_argument("--mezo_lora_learning_rate", type=float, default=3e-3)
    parser.add_argument("--zo_eps", type=float, default=1e-3)
    parser.add_argument("--ft_steps", type=int, default=500)
    parser.add_argument("--ft_learning_rate", type=float, default=1e-3)
    parser.add_argument("--features_dir", default="outputs/accuracy_features")
    parser.add_argument("--output", default=str(HERE / "results" / "accuracy.json"))
    return parser.parse_args(argv)


def lora_head(head):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["label_head"], modules_to_save=["norm"], lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(head), config)


def run_split(head, train, test, args, out_dir: Path) -> dict:
    batch = len(train[1])  # full batch: at most 1,024 cached rows, a step costs well under 10 ms
    common = dict(
        per_device_train_batch_size=batch,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=42,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        log_level="error",
    )
    every = max(1, args.mezo_steps // 10)
    results = {"zero_shot": {"test_accuracy": accuracy(head, *test)}}
    results["linear_probe"] = linear_probe(head, train, test)
    ft = TrainingArguments(str(out_dir / "ft"), max_steps=args.ft_steps, learning_rate=args.ft_learning_rate, **common)
    results["ft"] = train_head(Trainer, ft, copy.deepcopy(head), train, test, args.ft_steps, float("inf"))
    for name, model, lr in (
        ("mezo", copy.deepcopy(head), args.mezo_learning_rate),
        ("mezo_lora", lora_head(head), args.mezo_lora_learning_rate),
    ):
        mezo = MeZOConfig(
            str(out_dir / name), max_steps=args.mezo_steps, learning_rate=lr, zo_eps=args.zo_eps, **common
        )
        results[name] = train_head(MeZOTrainer, mezo, model, train, test, every, float("inf"))
        results[name]["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return results


def features(model, tokenizer, split, path: Path):
    if path.is_file():
        return torch.load(path)
    start = time.perf_counter()
    pair = (last_token_states(model, tokenizer, prompts(split)), torch.tensor(split["label"]))
    print(f"hidden states of {len(split)} prompts: {time.perf_counter() - start:.1f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pair, path)
    return pair


def summarize(runs: dict) -> dict:
    table = {}
    for k, by_seed in runs.items():
        for method in METHODS:
            rows = [by_seed[seed][method] for seed in by_seed]
            cell = {}
            for key in ("test_accuracy", "wall_s", "peak_mib"):
                values = [r[key] for r in rows if key in r]
                if values:
                    cell[key] = statistics.mean(values)
                    cell[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            table[f"{k}/{method}"] = cell
    return table


def main(argv=None) -> dict:
    args = parse_args(argv)
    shipped = set(shipped_kshot_splits())
    gguf = smollm2_gguf_path()
    model = load_gguf_model(gguf).eval()
    tokenizer = load_gguf_tokenizer(gguf)
    tokenizer.padding_side = "right"
    label_ids = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in LABEL_WORDS]
    head = LabelWordHead(model.model.norm, model.lm_head.weight[label_ids])
    features_dir = Path(args.features_dir)
    runs: dict = {}
    start = time.perf_counter()
    for k in args.ks:
        for seed in args.seeds:
            data = load_sst2(k, seed, None if (k, seed) in shipped else args.data_dir)
            train = features(model, tokenizer, data["train"], features_dir / f"train-{k}-{seed}.pt")
            test = features(model, tokenizer, data["test"], features_dir / "test-glue-dev.pt")
            result = run_split(head, train, test, args, features_dir / "runs")
            runs.setdefault(k, {})[seed] = result
            print(f"k={k} seed={seed}: " + ", ".join(f"{m} {result[m]['test_accuracy']:.1%}" for m in METHODS))
    table = summarize(runs)
    print(f"\nSmolLM2-135M-Instruct, SST-2 test (872 GLUE dev), seeds {args.seeds}; {platform.processor() or 'CPU'}")
    print(f"{'k':>4} {'method':<13}{'test acc':>15}{'wall s':>10}{'peak MiB':>10}")
    for key, cell in table.items():
        k, method = key.split("/")
        acc = f"{cell['test_accuracy']:.1%} ± {cell['test_accuracy_std']:.1%}"
        wall = f"{cell['wall_s']:.1f}" if "wall_s" in cell else "—"
        peak = f"{cell['peak_mib']:.1f}" if "peak_mib" in cell else "—"
        print(f"{k:>4} {method:<13}{acc:>15}{wall:>10}{peak:>10}")
    for run in (r for by_seed in runs.values() for r in by_seed.values()):
        for name in ("ft", "mezo", "mezo_lora"):
            run[name].pop("loss", None)
    output = {
        "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads",
        "settings": vars(args),
        "summary": table,
        "runs": {str(k): {str(s): r for s, r in v.items()} for k, v in runs.items()},
        "wall_s_total": time.perf_counter() - start,
    }
    write_results(args.output, output)
    print(f"wrote {args.output}")
    return output


if __name__ == "__main__":
    main()
