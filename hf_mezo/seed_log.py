"""The seed log: a MeZO run as its scalars, replayable onto the base weights without moving any weight.

Every zeroth-order update is a function of the base weights, seeds hf_mezo controls, and a few scalars
per step: the estimator's per-probe values (reduced across processes), the learning rate of each param
group, and whether the step was skipped. `MeZOConfig(zo_seed_log=True)` records them (the optimizer keeps
them in its `state_dict`, so a resumed run continues the log) and the trainer writes `seed_log.json` into
`output_dir` at every checkpoint and at the end of training. `replay_seed_log(model, path)` rebuilds the
optimizer from the log's header and feeds it the recorded scalars, step by step: the same code applies the
same updates, so the result is bit-identical to the trained weights (fp32 and bf16 with its seeded
stochastic rounding), and no forward pass runs.

File: JSON with `header` (format, hf_mezo version, method fields, run seed, ε, stochastic rounding, the
trainable parameters' names, shapes, dtypes and param groups, per-parameter SHA-256 of the base values) and
`steps` (step index, values, learning rates, skipped), and a SHA-256 `checksum` of both: a truncated or
edited log is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

SEED_LOG_NAME = "seed_log.json"
FORMAT = "hf_mezo.seed_log/1"


class SeedLogError(ValueError):
    """A seed log that cannot be replayed as asked: damaged, or for other base weights."""


def parameter_digest(param: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (exact: one flipped bit changes it)."""
    tensor = param.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tensor.dtype}/{tuple(tensor.shape)}".encode())
    h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_header(optimizer) -> dict[str, Any]:
    """What a replay needs besides the per-step scalars, from a `ZerothOrderSGD` before its first update."""
    from . import __version__

    group0 = optimizer.param_groups[0]
    parameters = []
    for index, group in enumerate(optimizer.param_groups):
        for param, name in zip(group["params"], group["param_names"]):
            if param.requires_grad:
                parameters.append(
                    {"name": name, "shape": list(param.shape), "dtype": str(param.dtype).removeprefix("torch."),
                     "group": index, "sha256": parameter_digest(param)}
                )  # fmt: skip
    return {
        "format": FORMAT,
        "hf_mezo_version": __version__,
        "method": dict(vars(optimizer.method)),
        "seed": int(group0["seed"]),
        "eps": float(group0["eps"]),
        "stochastic_rounding": bool(group0["stochastic_rounding"]),
        "start_step": int(group0["zo_step"]),
        "groups": [{"weight_decay": float(g["weight_decay"])} for g in optimizer.param_groups],
        "parameters": parameters,
    }


def _checksum(header: dict, steps: dict) -> str:
    canonical = json.dumps({"header": header, "steps": steps}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_document(header: dict, records: list[dict]) -> dict:
    steps = {
        "step": [r["step"] for r in records],
        "values": [r["values"] for r in records],
        "lr": [r["lr"] for r in records],
        "skipped": [r["skipped"] for r in records],
    }
    return {"header": header, "steps": steps, "checksum": _checksum(header, steps)}


def save_seed_log(path: str | os.PathLike, header: dict, records: list[dict]) -> Path:
    """Write the log as JSON (floats in their exact shortest repr), atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / SEED_LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_document(header, records), separators=(",", ":")))
    os.replace(tmp, path)
    return path


def load_seed_log(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, records) of a log file or of a directory holding `seed_log.json`; damaged logs are refused."""
    path = Path(path)
    if path.is_dir():
        path = path / SEED_LOG_NAME
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SeedLogError(f"{path} is not a complete seed log (truncated or not JSON: {error}).") from None
    if not isinstance(document, dict) or document.get("header", {}).get("format") != FORMAT:
        raise SeedLogError(f"{path} is not a {FORMAT} seed log.")
    header, steps = document["header"], document.get("steps", {})
    if document.get("checksum") != _checksum(header, steps):
        raise SeedLogError(
            f"{path}: the checksum does not match its contents: the log was edited or damaged after it was written. "
            "Replaying it would not give the trained weights; use the file the trainer wrote."
        )
    columns = ("step", "values", "lr", "skipped")
    if len({len(steps[c]) for c in columns}) != 1:
        raise SeedLogError(f"{path}: the step columns have different lengths.")
    records = [dict(zip(columns, row)) for row in zip(*(steps[c] for c in columns))]
    expected = list(range(header["start_step"], header["start_step"] + len(records)))
    if [r["step"] for r in records] != expected:
        raise SeedLogError(f"{path}: steps are not consecutive from {header['start_step']}: the log is incomplete.")
    return header, records


def _check_base(model: nn.Module, header: dict) -> dict[str, nn.Parameter]:
    """The model's parameters named in the header, after checking each one's shape, dtype and base values."""
    named = dict(model.named_parameters())
    for entry in header["parameters"]:
        name = entry["name"]
        if name not in named:
            raise SeedLogError(
                f"the base model has no parameter {name!r}, which the seed log trained. Load the base model (and "
                "adapter configuration) the log was recorded on."
            )
        param = named[name]
        dtype = str(param.dtype).removeprefix("torch.")
        if list(param.shape) != entry["shape"] or dtype != entry["dtype"]:
            raise SeedLogError(
                f"parameter {name!r} is {dtype}{list(param.shape)} in the base model but {entry['dtype']}"
                f"{entry['shape']} in the seed log."
            )
        if parameter_digest(param) != entry["sha256"]:
            raise SeedLogError(
                f"parameter {name!r} of the base model differs from the weights the seed log started from (SHA-256 "
                "mismatch): replaying onto other weights would not give the trained model. Load the same base "
                "checkpoint (same revision and dtype), before any training."
            )
    return {entry["name"]: named[entry["name"]] for entry in header["parameters"]}


@torch.no_grad()
def replay_seed_log(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a seed log to the base `model` in place: the trained weights, bit for bit, without a forward pass.

    Refuses a base whose parameter set, shapes, dtypes or values differ from the log's start (naming the first
    mismatch), and a truncated or edited log.
    """
    import warnings

    from .methods import ZerothOrderMethod
    from .optimizer import ZerothOrderSGD

    header, records = load_seed_log(path)
    params = _check_base(model, header)
    groups = [{"params": [], "weight_decay": g["weight_decay"]} for g in header["groups"]]
    for entry in header["parameters"]:
        groups[entry["group"]]["params"].append((entry["name"], params[entry["name"]]))
    flags = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)  # the optimizer moves exactly the logged set
    try:
        optimizer = ZerothOrderSGD(
            [g for g in groups if g["params"]],
            lr=0.0,
            eps=header["eps"],
            seed=header["seed"],
            stochastic_rounding=header["stochastic_rounding"],
            method=ZerothOrderMethod(**header["method"]),
        )
        kept = [i for i, g in enumerate(groups) if g["params"]]
        for record in records:
            for group, index in zip(optimizer.param_groups, kept):
                group["lr"] = record["lr"][index]
                group["zo_step"] = record["step"]
            optimizer.inject(record["values"], skipped=record["skipped"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a skipped step warned once, in training
                optimizer.step()
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return model


def write_seed_log_dir(
    directory: str | os.PathLike, log_path: str | os.PathLike, base_model: str, description: str = ""
) -> Path:
    """A shareable directory (Hub layout): the log and a README model card naming the base model and settings."""
    header, records = load_seed_log(log_path)
    directory = Path(directory)
    save_seed_log(directory / SEED_LOG_NAME, header, records)
    method = header["method"]
    trainable = sum(int(torch.Size(p["shape"]).numel()) for p in header["parameters"])
    card = f"""---
base_model: {base_model}
library_name: hf_mezo
tags: [hf_mezo, mezo, zeroth-order, seed-log]
---

# Seed log of a zeroth-order fine-tune of `{base_model}`

{description}

This repository holds no weights: `{SEED_LOG_NAME}` records the {len(records)} optimizer steps of a
`{method["name"]}` run (hf_mezo {header["hf_mezo_version"]}; ε = {header["eps"]}, run seed {header["seed"]},
{method["num_directions"]} probe(s) per step) over {len(header["parameters"])} parameter tensors
({trainable:,} values) of the base model. Replay it onto the base weights:

```python
from hf_mezo import replay_seed_log
model = ...  # load `{base_model}` exactly as for training (same dtype; the same adapter config if any)
replay_seed_log(model, "{SEED_LOG_NAME}")  # bit-identical to the trained weights; refuses other base weights
```
"""
    (directory / "README.md").write_text(card)
    return directory
