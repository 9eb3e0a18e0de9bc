"""The README's quickstart runs as written (on a tiny model: the name and the step count swapped, nothing else)."""

import re

import pytest

from .conftest import REPO


def _quickstart() -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)


@pytest.mark.slow  # ~60 s: a 50k-vocabulary head evaluated on the 872 test rows
def test_the_quickstart_trains_and_evaluates(tiny_mlm_dir, tmp_path, monkeypatch, capsys):
    # Before the fix, the quickstart named model/train/dev/collator/compute_metrics without defining them, needed
    # remove_unused_columns=False, and build_compute_metrics' pair passed as compute_metrics crashed in evaluate().
    code = _quickstart()
    assert code.count('"roberta-large"') == 1 and code.count("max_steps=100_000") == 1
    code = code.replace('"roberta-large"', repr(str(tiny_mlm_dir))).replace("max_steps=100_000", "max_steps=2")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    printed = capsys.readouterr().out
    metrics = eval(printed.strip().splitlines()[-1])
    assert set(metrics) >= {"eval_accuracy", "eval_f1", "eval_loss"}
    assert namespace["trainer"].state.global_step == 2
