"""The direction stream: generator seedings and launches per pass, time per pass, and the CPU generators.

1. Counts (meta tensors, nothing allocated): for the parameter shapes of roberta-large and OPT-13B, the
   chunks of z a pass draws, i.e. generator seedings (one blake2b hash + `manual_seed` each), and the
   tensor operations it issues (kernel launches on a GPU), under the CPU policy (64 Ki-element chunks,
   what every device used before) and the accelerator policy (16 Mi-element chunks, now used on CUDA).
   Launches of a fused perturbation pass (θ + εz chunk by chunk, Gaussian) are a fill and an add per chunk.
2. CPU time per pass over the parameters of a roberta shape (z drawn for every tensor, and the fused
   θ + εz), side by side with one `torch.randn` of the same total size, under both policies.
3. CPU generators, one thread, M values/s: `normal_`, Box–Muller on `uniform_` / on `random_` bits,
   numpy's Ziggurat (`standard_normal`) on PCG64 and SFC64, and Rademacher (±1).
4. GPU (only when one is present): time per pass vs one `torch.randn` (target ≤ 1.2×) and a full MeZO
   step on the roberta-large shape vs two forwards (target ≤ 1.3×). Without one it says so.

    python benchmarks/direction_stream.py                 # roberta-base shape for the CPU timings
    python benchmarks/direction_stream.py --shape large   # roberta-large shape

Prints tables and writes benchmarks/results/direction_stream[_<shape>].json.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_mezo import directions
from hf_mezo.directions import ACCELERATOR_CHUNK_NUMEL, CHUNK_NUMEL, add_direction, chunks_per_pass, draw_direction

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/recording.py
from recording import write_results  # noqa: E402

ROBERTA = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
STREAM = dict(run_seed=0, step=0, direction=0, distribution="gaussian")


def roberta(shape: str, device: str = "meta"):
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, **ROBERTA[shape])
    with torch.device(device):
        return RobertaForMaskedLM(config).eval()


def opt_13b():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=50272,
        hidden_size=5120,
        num_hidden_layers=40,
        ffn_dim=20480,
        num_attention_heads=40,
        max_position_embeddings=2048,
        word_embed_proj_dim=5120,
    )
    with torch.device("meta"):
        return OPTForCausalLM(config)


def count(name: str, model) -> dict:
    tensors = list(model.parameters())  # tied matrices once, as the optimizer holds them
    row = {"parameters": sum(t.numel() for t in tensors), "tensors": len(tensors)}
    for policy, device in (("cpu_64Ki", "cpu"), ("accelerator_16Mi", "cuda")):
        chunks = chunks_per_pass(tensors, device)
        row[policy] = {"seedings": chunks, "launches_fused_pass": 2 * chunks}
    return row


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_passes(params: list[tuple[str, torch.Tensor]], repeats: int, sync=lambda: None) -> dict:
    """Seconds per pass: z for every tensor, the fused θ + εz for every tensor, one randn of the total size."""
    total = sum(p.numel() for _, p in params)
    device = params[0][1].device
    buffer = torch.empty(total, device=device)

    def randn():
        buffer.normal_()  # what torch.randn(total) does, without the allocation
        sync()

    def draw():
        for name, p in params:
            draw_direction(name, p.numel(), **STREAM, dtype=torch.float32, device=device)
        sync()

    def fused():
        for name, p in params:
            add_direction(p.view(-1), name, p.numel(), **STREAM, scale=1e-3)
        sync()

    return {
        "randn": timed(randn, repeats),
        "draw_z": timed(draw, repeats),
        "fused_theta_plus_eps_z": timed(fused, repeats),
    }


def cpu_generators(numel: int, repeats: int) -> dict:
    """M values/s of exact Gaussian (and Rademacher) generators on one thread."""
    out = torch.empty(numel)
    half = numel // 2
    g = torch.Generator().manual_seed(0)
    bits = torch.empty(numel, dtype=torch.int32)

    def box_muller(u: torch.Tensor) -> None:  # u: numel values in [0, 1); writes out
        u1, u2 = u[:half], u[half:]
        radius = torch.log1p(-u1).mul_(-2).sqrt_()  # 1 − u1 ∈ (0, 1]: log is finite
        angle = u2.mul_(2 * math.pi)
        torch.mul(radius, torch.cos(angle), out=out[:half])
        torch.mul(radius, torch.sin(angle), out=out[half:])

    def bm_uniform():
        box_muller(torch.empty(numel).uniform_(generator=g))

    def bm_bits():
        bits.random_(0, 1 << 24, generator=g)
        box_muller(bits.float().mul_(2.0**-24))

    pcg, sfc = np.random.Generator(np.random.PCG64(0)), np.random.Generator(np.random.SFC64(0))
    out_np = np.empty(numel, dtype=np.float32)
    variants = {
        "torch normal_": lambda: out.normal_(generator=g),
        "Box-Muller on uniform_": bm_uniform,
        "Box-Muller on random_ bits": bm_bits,
        "numpy PCG64 Ziggurat": lambda: pcg.standard_normal(dtype=np.float32, out=out_np),
        "numpy SFC64 Ziggurat": lambda: sfc.standard_normal(dtype=np.float32, out=out_np),
        "Rademacher (random_ ±1)": lambda: out.random_(0, 2, generator=g).mul_(2).sub_(1),
    }
    return {name: numel / timed(fn, repeats) / 1e6 for name, fn in variants.items()}


def gpu_section(repeats: int, device: str = "cuda", shape: str = "large") -> dict:
    """On CUDA: the stream per pass vs one randn (target ≤ 1.2×), a MeZO step vs two forwards (target ≤ 1.3×).

    (`device="cpu", shape="tiny"` runs the same code as a smoke check of this function, not a measurement.)
    """
    from hf_mezo import ZerothOrderSGD
    from hf_mezo.perturbation import perturbed_forward

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    model = roberta(shape, device=device)
    params = [(n, p.detach()) for n, p in model.named_parameters()]
    passes = time_passes(params, repeats, sync=sync)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50265, (32, 128), generator=g).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, 64] = 6587
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    optimizer, eps = ZerothOrderSGD(model.named_parameters(), lr=1e-6, eps=1e-3), 1e-3

    def forward():
        with torch.no_grad():
            model(**inputs)
        sync()

    def step():
        with perturbed_forward(model, optimizer, 0, eps):
            plus = model(**inputs).loss
        with perturbed_forward(model, optimizer, 0, -eps):
            minus = model(**inputs).loss
        optimizer.accumulate(0, (plus - minus) / (2 * eps))
        optimizer.step()
        sync()

    f, s = timed(forward, repeats), timed(step, repeats)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "pass_s": passes,
        "pass_over_randn": passes["fused_theta_plus_eps_z"] / passes["randn"],
        "batch": [32, 128],
        "forward_s": f,
        "mezo_step_s": s,
        "mezo_step_over_two_forwards": s / (2 * f),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="base", choices=sorted(ROBERTA), help="roberta shape for CPU timings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generator-numel", type=int, default=1 << 23)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    machine = (
        f"{cpu or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    )
    results: dict = {"machine": machine, "chunk_numel": {"cpu": CHUNK_NUMEL, "accelerator": ACCELERATOR_CHUNK_NUMEL}}

    # 1. counts
    results["counts"] = {
        "roberta-large": count("roberta-large", roberta("large")),
        "OPT-13B": count("OPT-13B", opt_13b()),
    }
    print(f"\nper pass (z once for every parameter tensor), {machine}")
    print(
        f"{'model':15}{'params':>9}{'tensors':>9}{'seedings 64Ki':>15}{'seedings 16Mi':>15}{'launches 64Ki':>15}{'launches 16Mi':>15}"
    )
    for name, row in results["counts"].items():
        old, new = row["cpu_64Ki"], row["accelerator_16Mi"]
        print(
            f"{name:15}{row['parameters'] / 1e6:8.0f}M{row['tensors']:9}{old['seedings']:15,}{new['seedings']:15,}"
            f"{old['launches_fused_pass']:15,}{new['launches_fused_pass']:15,}"
        )

    # 2. CPU time per pass, both policies
    model = roberta(args.shape, device="cpu")
    params = [(n, p.detach()) for n, p in model.named_parameters()]
    total = sum(p.numel() for _, p in params)
    results["cpu_pass"] = {"shape": f"roberta-{args.shape}", "values": total}
    print(f"\nCPU seconds per pass, roberta-{args.shape} shape ({total / 1e6:.1f}M values), median of {args.repeats}")
    print(f"{'policy':22}{'randn(total)':>14}{'draw z':>10}{'÷ randn':>9}{'θ+εz fused':>12}{'÷ randn':>9}")
    for policy, chunk in (("cpu_64Ki", CHUNK_NUMEL), ("accelerator_16Mi", ACCELERATOR_CHUNK_NUMEL)):
        directions.CHUNK_NUMEL_BY_DEVICE_TYPE["cpu"] = chunk
        try:
            t = time_passes(params, args.repeats)
        finally:
            directions.CHUNK_NUMEL_BY_DEVICE_TYPE["cpu"] = CHUNK_NUMEL
            directions.clear_cache()
        results["cpu_pass"][policy] = t
        r, d, f = t["randn"], t["draw_z"], t["fused_theta_plus_eps_z"]
        print(f"{policy:22}{r:14.3f}{d:10.3f}{d / r:9.2f}{f:12.3f}{f / r:9.2f}")
    del model, params

    # 3. generators
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results["cpu_generators_mvalues_per_s"] = cpu_generators(args.generator_numel, args.repeats)
    finally:
        torch.set_num_threads(threads)
    print(f"\nCPU generators, one thread, {args.generator_numel / 2**20:.0f} Mi float32 values: M values/s")
    for name, rate in results["cpu_generators_mvalues_per_s"].items():
        print(f"{name:28}{rate:10.0f}")

    # 4. GPU
    if torch.cuda.is_available():
        results["gpu"] = gpu_section(args.repeats)
        gpu = results["gpu"]
        print(f"\nGPU {gpu['device']}: pass / randn {gpu['pass_over_randn']:.2f}× (target ≤ 1.2×), MeZO step / two "
              f"forwards {gpu['mezo_step_over_two_forwards']:.2f}× (target ≤ 1.3×)")  # fmt: skip
    else:
        results["gpu"] = "not measured: no GPU"
        print("\nGPU: not measured: no GPU")

    output = args.output or Path(__file__).parent / "results" / (
        "direction_stream.json" if args.shape == "base" else f"direction_stream_{args.shape}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output = write_results(output, results)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
