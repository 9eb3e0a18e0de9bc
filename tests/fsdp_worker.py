"""MeZO on a tiny float64 RoBERTa sharded by FSDP2 (`fully_shard`) over 2 CPU processes (gloo).

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml tests/fsdp_worker.py --out DIR

Accelerate's FSDP plugin (and so `MeZOTrainer` under FSDP) needs GPUs; `fully_shard` itself runs on
CPU. This drives the same pieces the trainer uses — `ZerothOrderSGD`, the perturbation context, the
mean-reduction of the projected gradients through Accelerate — on a sharded model, so the tests can
compare the sharded trajectory with an unsharded one (`main` with one process, no sharding).
Rank 0 writes DIR/result.pt: the full parameters after training (gathered from the shards), the
projected gradients of every step, and each process's shard layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_roberta_config  # noqa: E402

EPS = 1e-4


def _batches(steps: int, global_batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (steps * global_batch, 6), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = ids[:, 1] % 2
    return [
        {"input_ids": ids[i : i + global_batch], "labels": labels[i : i + global_batch]}
        for i in range(0, len(ids), global_batch)
    ]


def main(argv: list[str] | None = None) -> dict:
    from accelerate import PartialState
    from accelerate.utils import reduce
    from transformers import RobertaForSequenceClassification

    from hf_mezo import ZerothOrderSGD
    from hf_mezo.perturbation import perturbed, unperturbed
    from hf_mezo.shards import local_shard

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--method", default="mezo", help="zo_method; factored ones with rank 2, refresh every 2 steps")
    options = parser.parse_args(argv)

    state = PartialState(cpu=True)
    torch.manual_seed(0)
    dtype = getattr(torch, options.dtype)
    model = RobertaForSequenceClassification(tiny_roberta_config(num_labels=2)).to(dtype).eval()
    if state.num_processes > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (state.num_processes,))
        for layer in model.roberta.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    knobs = {"num_directions": 2} if options.method == "mezo" else {"rank": 2, "refresh_interval": 2}
    if options.method == "lozo":
        knobs["momentum"] = 0.5
    optimizer = ZerothOrderSGD(
        model.named_parameters(), lr=1e-2, weight_decay=0.01, eps=EPS, seed=5, method=options.method, **knobs
    )
    optimizer.set_reduction(lambda grads: reduce(grads, reduction="mean"))

    per_rank = options.global_batch // state.num_processes
    history = []
    for batch in _batches(options.steps, options.global_batch):
        local = {k: v[state.process_index * per_rank : (state.process_index + 1) * per_rank] for k, v in batch.items()}
        losses = []
        for probe, scale in optimizer.passes():  # every rank runs every pass: each forward all-gathers
            if probe is None:
                with unperturbed(model, optimizer):
                    losses.append(model(**local).loss.double())
            else:
                with perturbed(model, optimizer, probe, scale):
                    losses.append(model(**local).loss.double())
        optimizer.accumulate_passes(losses)
        history.append(optimizer.projected_grads().clone())
        optimizer.step()

    layout = {}
    full = {}
    for name, param, _ in optimizer.named_trainable_parameters():
        shard, start = local_shard(param)
        layout[name] = (start, shard.numel(), param.numel())
        full[name] = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
    layouts = [None] * state.num_processes
    if state.num_processes > 1:
        torch.distributed.all_gather_object(layouts, layout)
    else:
        layouts = [layout]
    result = {"params": full, "projected_grads": torch.stack(history), "layouts": layouts}
    if state.is_main_process:
        Path(options.out).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(options.out) / "result.pt")
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()  # otherwise torch.distributed aborts the process at exit
    return result


if __name__ == "__main__":
    main()
