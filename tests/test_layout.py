"""The layout reads top-down: every hf_mezo module imports on its own, and no module imports one above it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_mezo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """hf_mezo modules that `path` imports (relative imports resolved), at any depth of the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in MODULES and c != name)
    return found


_IMPORT_EACH_ALONE = """
import importlib, sys, traceback
import torch, transformers, accelerate  # third-party imports stay cached: only hf_mezo is re-imported each time
failed = []
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n == "hf_mezo" or n.startswith("hf_mezo.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        failed.append(module + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_alone():
    """`python -c "import hf_mezo.x"` for every module, in one fresh interpreter (hf_mezo cleared between them)."""
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_no_import_cycle_among_hf_mezo_modules():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    # A package's __init__ re-exports its children; importing a child from the package's own __init__ is not a
    # cycle, so edges from a package to its submodules are dropped before the search.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".") and not name.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize(
    "lower,higher", [("hf_mezo.optimizer", "hf_mezo.distributed"), ("hf_mezo.optimizer", "hf_mezo.perturbation")]
)
def test_the_optimizer_imports_nothing_above_it(lower, higher):
    path = PACKAGE / (lower.removeprefix("hf_mezo.").replace(".", "/") + ".py")
    assert not any(t == higher or t.startswith(higher + ".") for t in _imports(path))


@pytest.mark.parametrize("higher", ["hf_mezo.optimizer", "hf_mezo.perturbation", "hf_mezo.trainer", "hf_mezo.config"])
def test_the_methods_import_nothing_above_them(higher):
    """Methods sit between the optimizer and the direction stream: optimizer → methods → directions."""
    for path in (PACKAGE / "methods").glob("*.py"):
        assert not any(t == higher or t.startswith(higher + ".") for t in _imports(path)), path.name
