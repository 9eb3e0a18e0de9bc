"""Distributed MeZO on 2 real CPU processes (gloo), against the 1-process run of the same global batch.

The launching tests start `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` on the
worker scripts next to this file, so they also exercise the config users are told to run.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_mezo.distributed import (
    RankDivergenceError,
    _disagreement,
    check_rank_consistency,
    parameter_checksums,
    shard_rows,
)

from .conftest import REPO

TESTS = Path(__file__).resolve().parent
CPU_2PROC = REPO / "accelerate_configs" / "cpu_2proc.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]
    command += ["--main_process_port", str(_free_port()), str(TESTS / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# ---- data parallel through MeZOTrainer ----------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """6 steps of global batch 8 on 2 processes (4 each), checkpoints at 3 and 6, ranks initialized differently."""
    out = tmp_path_factory.mktemp("two")
    run = _launch(
        "distributed_worker.py", "--out", str(out), "--steps", "6", "--save_steps", "3", "--rank_dependent_init"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return out, [_load(out / f"rank{r}.pt") for r in range(2)], run.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from .distributed_worker import main

    return main(["--out", str(tmp_path_factory.mktemp("one")), "--steps", "6"])


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_stay_bit_identical_and_the_model_is_never_wrapped_in_ddp(two_processes):
    _, (rank0, rank1), stderr = two_processes
    assert rank0["world_size"] == rank1["world_size"] == 2
    for name, param in rank0["params"].items():
        assert torch.equal(param.view(torch.int64), rank1["params"][name].view(torch.int64)), name
    # training_step saw the bare model on both ranks, and the Trainer kept it unwrapped.
    for rank in (rank0, rank1):
        assert rank["model_classes"] == ["RobertaForSequenceClassification"]
        assert rank["wrapped_class"] == "RobertaForSequenceClassification"
    # Rank 1 started from other weights; like DDP's constructor, the start made it rank 0's, and said so.
    assert "broadcasting rank 0's parameters" in stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(two_processes, one_process):
    _, (rank0, _), _ = two_processes
    assert _max_difference(rank0["params"], one_process["params"]) <= 1e-10
    two_logs = [log for log in rank0["log_history"] if "grad_norm" in log]
    one_logs = [log for log in one_process["log_history"] if "grad_norm" in log]
    assert len(two_logs) == len(one_logs) == 6
    for two, one in zip(two_logs, one_logs):
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6, abs=1e-9)  # logged in float32
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    # Evaluation is the Trainer's: predictions gathered in dataset order, the padding of the uneven
    # last batch dropped, metrics computed once on all 11 examples.
    assert rank0["predictions"].shape == one_process["predictions"].shape == (11, 2)
    assert float((rank0["predictions"] - one_process["predictions"]).abs().max()) <= 1e-10
    assert rank0["metrics"]["eval_accuracy"] == one_process["metrics"]["eval_accuracy"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(two_processes, tmp_path):
    from .distributed_worker import main

    out, (rank0, _), _ = two_processes
    checkpoint = out / "trainer" / "checkpoint-3"
    # One copy of the model and optimizer (written by the main process); RNG states per process.
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["model.safetensors"]
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert optimizer_state["param_groups"][0]["zo_step"] == 3 and not optimizer_state["state"]

    resumed = main(["--out", str(tmp_path), "--steps", "6", "--resume", str(checkpoint)])
    assert resumed["world_size"] == 1
    assert _max_difference(resumed["params"], rank0["params"]) <= 1e-10


@pytest.mark.distributed
@pytest.mark.slow
def test_a_corrupted_rank_is_detected_before_the_checkpoint_is_written(tmp_path):
    run = _launch(
        "distributed_worker.py", "--out", str(tmp_path), "--steps", "2", "--save_steps", "2",
        "--corrupt_rank", "1", "--corrupt_step", "2", "--num_directions", "1",
    )  # fmt: skip
    assert run.returncode != 0
    log = run.stdout + run.stderr
    assert "RankDivergenceError" in log
    assert "at checkpoint save" in log and "rank(s) [1] disagree with rank(s) [0]" in log
    assert "'classifier.out_proj.weight'" in log
    assert not (tmp_path / "trainer" / "checkpoint-2").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_processes_with_different_seeds_refuse_to_start(tmp_path):
    run = _launch("distributed_worker.py", "--out", str(tmp_path), "--steps", "1", "--zo_seed_per_rank")
    assert run.returncode != 0
    log = run.stdout + run.stderr
    assert "RankDivergenceError" in log and "disagree on their direction seed at the start of training" in log
    assert "rank(s) [1] vs [0]" in log


@pytest.mark.distributed
@pytest.mark.slow
def test_a_training_set_that_does_not_divide_by_the_global_batch_is_refused_or_drops_its_tail(tmp_path):
    # Accelerate fills the last batch of an epoch with rows from its start (even_batches): before the fix, 2 processes
    # then trained on other data than 1 process, without a word (0.19 max weight difference after a few steps).
    common = ["--steps", "3", "--num_directions", "1", "--extra_rows", "5"]  # 29 rows, global batch 8
    refused = _launch("distributed_worker.py", "--out", str(tmp_path / "refused"), *common)
    assert refused.returncode != 0
    log = refused.stdout + refused.stderr
    assert "29 rows, not a multiple of the global batch 8 (4 per device × 2 processes)" in log, log[-3000:]
    assert "dataloader_drop_last=True" in log

    from .distributed_worker import main

    two = _launch("distributed_worker.py", "--out", str(tmp_path / "two"), *common, "--drop_last")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    one = main(["--out", str(tmp_path / "one"), *common, "--drop_last"])
    assert _max_difference(_load(tmp_path / "two" / "rank0.pt")["params"], one["params"]) <= 1e-10


def test_the_global_batch_condition_counts_rows_per_epoch():
    from transformers import TrainingArguments

    from hf_mezo.refusals import refuse_uneven_last_batch

    args = TrainingArguments("unused", use_cpu=True, report_to=[])
    refuse_uneven_last_batch(list(range(24)), args, batch_size=4, num_processes=2)  # divides
    refuse_uneven_last_batch(list(range(25)), args, batch_size=4, num_processes=1)  # one process: nothing differs
    with pytest.raises(ValueError, match="25 rows, not a multiple of the global batch 8 .*drops the last 1 row"):
        refuse_uneven_last_batch(list(range(25)), args, batch_size=4, num_processes=2)
    args.dataloader_drop_last = True
    refuse_uneven_last_batch(list(range(25)), args, batch_size=4, num_processes=2)


# ---- sharded (FSDP2) -------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["mezo", "lozo", "zo_muon"])
def test_fsdp2_sharded_run_follows_the_unsharded_trajectory(tmp_path, method):
    """Factored methods too: each rank updates its rows of s·A·Bᵀ, momentum buffers are per rank and equal."""
    from .fsdp_worker import main

    run = _launch("fsdp_worker.py", "--out", str(tmp_path / "sharded"), "--steps", "3", "--method", method)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    sharded = _load(tmp_path / "sharded" / "result.pt")
    unsharded = main(["--out", str(tmp_path / "unsharded"), "--steps", "3", "--method", method])

    # Each process held, perturbed and updated only its rows; together the shards tile every parameter.
    for name, (_, _, numel) in sharded["layouts"][0].items():
        spans = sorted((start, start + size) for start, size, _ in (layout[name] for layout in sharded["layouts"]))
        assert spans[0][0] == 0 and spans[-1][1] == numel, name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name
    assert any(size == 0 for layout in sharded["layouts"] for _, size, _ in layout.values())  # an empty shard too
    torch.testing.assert_close(sharded["projected_grads"], unsharded["projected_grads"], rtol=1e-9, atol=1e-10)
    assert _max_difference(sharded["params"], unsharded["params"]) <= 1e-10


# ---- single-process pieces -------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8])
def test_shard_rows_tile_dim_0_as_torch_chunk_does(num_shards):
    for rows in range(0, 12):
        spans = [shard_rows(rows, num_shards, i) for i in range(num_shards)]
        chunks = [len(c) for c in torch.arange(rows).chunk(num_shards)] if rows else []
        sizes = [end - start for start, end in spans]
        assert sizes[: len(chunks)] == chunks and not any(sizes[len(chunks) :])
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[0][0] == 0 and spans[-1][1] == rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_checksums_see_a_single_flipped_bit(dtype):
    g = torch.Generator().manual_seed(0)
    tensor = (torch.randn(37, 5, generator=g) * 3).to(dtype)
    other = tensor.clone()
    bits = other.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[other.element_size()])
    bits[17, 3] ^= 1
    assert torch.equal(parameter_checksums([tensor]), parameter_checksums([tensor.clone()]))
    assert not torch.equal(parameter_checksums([tensor]), parameter_checksums([other]))
    # Non-contiguous and 0-d tensors are fine; the result is one int64 per tensor.
    assert parameter_checksums([tensor.t(), tensor[0, 0]]).shape == (2,)


def test_disagreement_names_the_minority_ranks_and_the_tensors():
    rows = torch.tensor([[5, 1, 10, 20], [5, 1, 10, 20], [5, 1, 11, 20], [5, 1, 10, 20]])
    labels = ["direction seed", "optimizer step", "parameter 'a'", "parameter 'b'"]
    assert _disagreement(rows, labels) == ([2], [0, 1, 3], ["parameter 'a'"])
    assert _disagreement(rows[[0, 1, 3]], labels) is None
    # Two against two: the group holding rank 0 is the reference.
    assert _disagreement(rows[[2, 0, 1, 2]], labels) == ([1, 2], [0, 3], ["parameter 'a'"])


def test_consistency_check_is_free_in_one_process():
    model = torch.nn.Linear(3, 2)
    check_rank_consistency(model)  # no collective, no error
    assert issubclass(RankDivergenceError, RuntimeError)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "method_args",
    [["--zo_method", "fzoo"], ["--zo_method", "lozo", "--zo_momentum", "0.5", "--zo_refresh_interval", "2"],
     ["--zo_method", "zo_muon", "--zo_refresh_interval", "2"]],
    ids=["fzoo", "lozo_momentum", "zo_muon"],
)  # fmt: skip
def test_every_method_on_two_processes_follows_one_process(tmp_path, method_args):
    """Each method exchanges only its per-probe scalars; normalisation and momentum happen after the mean."""
    from .distributed_worker import main

    run = _launch("distributed_worker.py", "--out", str(tmp_path / "two"), "--steps", "4", *method_args)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    two = _load(tmp_path / "two" / "rank0.pt")
    one = main(["--out", str(tmp_path / "one"), "--steps", "4", *method_args])
    assert _max_difference(two["params"], one["params"]) <= 1e-10
    norms = [log["grad_norm"] for log in one["log_history"] if "grad_norm" in log]
    assert len(norms) == 4 and all(norm > 0 for norm in norms)  # the runs measured something and moved
