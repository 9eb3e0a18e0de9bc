"""A tiny float64 RoBERTa trained by `MeZOTrainer`; launched by tests/test_distributed.py on 1 or 2 CPU processes.

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        tests/distributed_worker.py --out DIR --steps 6 --save_steps 3

The global batch is `--global_batch` whatever the number of processes, so runs on 1 and 2 processes
optimize the same objective step by step. Each process writes DIR/rank<r>.pt: its final parameters,
the Trainer's log history, the class of the model that `training_step` received, and the gathered
predictions and metrics on a small evaluation set. The tests import `main` for the 1-process runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, when launched as a script

from conftest import tiny_roberta_config  # noqa: E402


def _dataset(n: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 6), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 2).tolist()})


def main(argv: list[str] | None = None) -> dict:
    from transformers import RobertaForSequenceClassification, TrainerCallback

    from hf_mezo import MeZOConfig, MeZOTrainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--rank_dependent_init", action="store_true", help="each rank initializes differently")
    parser.add_argument("--corrupt_rank", type=int, default=-1)
    parser.add_argument("--corrupt_step", type=int, default=1)
    parser.add_argument("--num_directions", type=int, default=None, help="None: 2 for mezo, else the method's")
    parser.add_argument("--zo_method", default="mezo")
    parser.add_argument("--zo_seed_log", action="store_true")
    parser.add_argument("--zo_momentum", type=float, default=None)
    parser.add_argument("--zo_refresh_interval", type=int, default=None)
    parser.add_argument("--extra_rows", type=int, default=0, help="rows beyond global_batch × steps")
    parser.add_argument("--drop_last", action="store_true")
    parser.add_argument("--zo_seed_per_rank", action="store_true", help="each rank draws from its own seed (an error)")
    options = parser.parse_args(argv)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(options.out)
    args = MeZOConfig(
        output_dir=str(out / "trainer"),
        max_steps=options.steps,
        per_device_train_batch_size=options.global_batch // world_size,
        per_device_eval_batch_size=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        zo_eps=1e-4,
        zo_num_directions=options.num_directions or (2 if options.zo_method == "mezo" else None),
        zo_method=options.zo_method,
        zo_seed_log=options.zo_seed_log,
        zo_momentum=options.zo_momentum,
        zo_refresh_interval=options.zo_refresh_interval,
        zo_seed=100 + rank if options.zo_seed_per_rank else None,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        disable_tqdm=True,
        dataloader_drop_last=options.drop_last,
        seed=5,
    )
    torch.manual_seed(rank if options.rank_dependent_init else 0)
    model = RobertaForSequenceClassification(tiny_roberta_config(num_labels=2)).double()

    class RecordingTrainer(MeZOTrainer):
        model_classes: set[str] = set()

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.model_classes.add(type(model).__name__)
            return super().training_step(model, inputs, num_items_in_batch)

    class Corrupt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if rank == options.corrupt_rank and state.global_step == options.corrupt_step:
                with torch.no_grad():
                    weight = model.classifier.out_proj.weight
                    weight.view(torch.int64)[0, 0] ^= 1  # one flipped bit of one weight

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(options.global_batch * options.steps + options.extra_rows, seed=0),
        eval_dataset=_dataset(11, seed=1),  # not a multiple of the batch: the gather must drop the padding
        compute_metrics=accuracy,
        callbacks=[Corrupt()],
    )
    trainer.train(resume_from_checkpoint=options.resume)
    metrics = trainer.evaluate()
    prediction = trainer.predict(trainer.eval_dataset)
    result = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "log_history": trainer.state.log_history,
        "model_classes": sorted(RecordingTrainer.model_classes),
        "wrapped_class": type(trainer.model_wrapped).__name__,
        "metrics": metrics,
        "predictions": torch.as_tensor(prediction.predictions),
        "world_size": trainer.accelerator.num_processes,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{trainer.accelerator.process_index}.pt")
    # Without this, torch.distributed aborts the process at exit (the gloo group is still alive).
    trainer.accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
