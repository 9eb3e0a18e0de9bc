"""What every benchmark writes beside its figures: the commit and the machine they were measured on.

`write_results(path, payload)` writes `payload` as JSON with a `recorded` block — the git commit of the
code measured (marked when hf_mezo/, examples/ or benchmarks/ had uncommitted changes), the machine
(platform, CPU count, torch build, accelerator) and the UTC time — so that a figure in the README or
docs can name the commit and machine it came from. In quick mode (`HF_MEZO_BENCH_QUICK=1`, as
`make bench QUICK=1` sets: small sizes, a smoke run of every benchmark) results go to
`benchmarks/results/quick/`, which git ignores, so a smoke run never replaces a committed result.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("HF_MEZO_BENCH_QUICK", "") not in ("", "0")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    """HEAD's hash, with "+uncommitted" when the measured code differs from it."""
    head = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "hf_mezo", "examples", "benchmarks", ":!benchmarks/results")
    return head + ("+uncommitted" if dirty else "")


def machine() -> dict[str, Any]:
    import torch

    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "accelerator": accelerator,
    }


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` + the `recorded` block to `path` (under results/quick/ in quick mode); return the path."""
    path = Path(path)
    if QUICK:
        path = path.parent / "quick" / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = {
        "commit": commit(),
        "machine": machine(),
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": QUICK,
    }
    path.write_text(json.dumps({**payload, "recorded": recorded}, indent=2) + "\n")
    return path
