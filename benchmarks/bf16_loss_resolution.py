"""bf16/fp16 weights: how often L₊ − L₋ rounds to 0, and how wrong g is, with and without float32 logits.

On the masked-LM demo's model (MiniLM-L6 from `examples/demo_mlm.py`, top 2 layers + head trainable) cast to bf16
(and fp16), with either head — hf_mezo's label-word head (its loss is already float32 inside) or the
stock `BertForMaskedLM` head (cross-entropy over the full vocabulary, in the weights' dtype) — for
`--directions` MeZO directions z (ε = 1e-3), each on its own batch of 16 SST-2 k = 512 prompts,
computes g = (L₊ − L₋)/2ε three ways:

  low-precision loss   the model as loaded: logits and cross-entropy in bf16/fp16 (`zo_float32_logits=False`)
  float32 logits       hf_mezo's default: the head's output upcast, the loss computed in float32
  float64 reference    a float64 copy of the model run on exactly the same perturbed bf16/fp16 weights

and reports the fraction of directions with g == 0 and the error of g against the reference,
‖g − g_ref‖ / ‖g_ref‖ (so rounding in the forward is measured, not the rounding of θ ± εz itself).

    python benchmarks/bf16_loss_resolution.py                  # 40 directions
    python benchmarks/bf16_loss_resolution.py --directions 10  # quicker

Prints a table and writes benchmarks/results/bf16_loss_resolution.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_TOP_LAYERS = 2  # perturb two encoder layers and the head, so the forward's rounding is part of g


def demo_model_and_batches(directions: int, batch_size: int, head: str):
    spec = importlib.util.spec_from_file_location("demo_mlm", EXAMPLES / "demo_mlm.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    sys.path.insert(0, str(EXAMPLES))
    import run_sst2
    from transformers import AutoTokenizer

    from hf_mezo import load_sst2
    from hf_mezo.models import freeze_all_but_top_layers
    from hf_mezo.prompting import PromptTemplate, Verbalizer, VerbalizerDataCollator

    argv = demo.merged_argv([] if head == "label_word" else ["--no_label_word_head"])
    model_args, data_args, _ = run_sst2.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    verbalizer = Verbalizer(data_args.label_words, tokenizer)
    torch.manual_seed(0)  # the checkpoint has no MLM head: the new head is drawn from the global RNG
    model = run_sst2.load_model(model_args, verbalizer, tokenizer).eval()
    freeze_all_but_top_layers(model, TRAIN_TOP_LAYERS)
    collator = VerbalizerDataCollator(
        tokenizer, PromptTemplate(data_args.template), verbalizer, max_length=data_args.max_seq_length
    )
    train = load_sst2(k=data_args.k, seed=42)["train"].shuffle(seed=0)
    batches = [collator([train[i * batch_size + j] for j in range(batch_size)]) for i in range(directions)]
    return model, batches


def projected_grads(model, optimizer, batches, eps, *, float32_logits_on=True, reference=None):
    from hf_mezo import float32_logits, perturbed_forward

    grads = []
    named = [(n, p) for n, p, _ in optimizer.named_trainable_parameters()]
    ref_params = dict(reference.named_parameters()) if reference is not None else None
    for step, batch in enumerate(batches):
        optimizer.param_groups[0]["zo_step"] = step
        losses = []
        for scale in (eps, -eps):
            with torch.no_grad():
                if reference is None:
                    with perturbed_forward(model, optimizer, 0, scale), float32_logits(model, float32_logits_on):
                        losses.append(model(**batch).loss.double())
                else:
                    for name, p in named:
                        ref_params[name].copy_(optimizer.perturbed(p, 0, scale).double())
                    losses.append(reference(**batch).loss.double())
        grads.append(float((losses[0] - losses[1]) / (2 * eps)))
    return torch.tensor(grads, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--heads", nargs="+", choices=["label_word", "stock"], default=["stock", "label_word"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(2)
    from hf_mezo import ZerothOrderSGD

    results = {}
    for head, name in [(head, name) for head in args.heads for name in args.dtypes]:
        model32, batches = demo_model_and_batches(args.directions, args.batch, head)
        start = time.perf_counter()
        model = copy.deepcopy(model32).to(DTYPES[name])
        reference = copy.deepcopy(model32).double()
        optimizer = ZerothOrderSGD([(n, p) for n, p in model.named_parameters() if p.requires_grad], eps=args.eps)
        exact = projected_grads(model, optimizer, batches, args.eps, reference=reference)
        runs = {
            f"{name} loss": projected_grads(model, optimizer, batches, args.eps, float32_logits_on=False),
            "float32 logits": projected_grads(model, optimizer, batches, args.eps, float32_logits_on=True),
        }
        key = f"{head} head, {name}"
        results[key] = {
            label: {
                "zero_fraction": float((g == 0).double().mean()),
                "relative_error": float((g - exact).norm() / exact.norm()),
                "correlation": float(torch.corrcoef(torch.stack([g, exact]))[0, 1]) if g.std() > 0 else 0.0,
                "distinct_values": len(set(g.tolist())),
            }
            for label, g in runs.items()
        }
        results[key]["reference"] = {"median_abs_g": float(exact.abs().median()), "zero_fraction": 0.0}
        results[key]["seconds"] = time.perf_counter() - start

    print(f"\ndemo model (MiniLM-L6, top 2 layers + head), {args.directions} directions, ε = {args.eps:g}\n")
    header = (
        f"{'head, weights':22s} {'loss computed as':18s} {'g == 0':>7s} {'‖g − g_ref‖/‖g_ref‖':>20s} {'corr':>6s} "
        f"{'distinct g':>11s}"
    )
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        for label, r in runs.items():
            if label in ("reference", "seconds"):
                continue
            print(
                f"{name:22s} {label:18s} {r['zero_fraction']:7.0%} {r['relative_error']:20.3f} "
                f"{r['correlation']:6.3f} {r['distinct_values']:11d}"
            )
        print(f"{name:22s} (float64 reference: median |g| = {runs['reference']['median_abs_g']:.3g})")
    path = HERE / "results" / "bf16_loss_resolution.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"directions": args.directions, "batch": args.batch, "eps": args.eps, "results": results}
    path = write_results(path, report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
