"""data_pipeline's modules import each other without a cycle (function-level imports included), each one
can be imported first, and none imports the trainer's packages (the contract lives in common/)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "data_pipeline"
MODULES = sorted(f"data_pipeline.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from pkg import module
    return found


def test_no_import_cycle_and_no_trainer_import():
    graph = {m: {d for d in imports_of(PACKAGE / f"{m.split('.')[1]}.py") if d in MODULES and d != m}
             for m in MODULES}
    for m in MODULES:
        outside = sorted(d for d in imports_of(PACKAGE / f"{m.split('.')[1]}.py")
                         if d.split(".")[0] in ("pretrain", "parallel"))
        assert not outside, f"{m} imports {outside}"
    done, path = set(), []

    def visit(m: str) -> None:
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)
    assert graph["data_pipeline.tokenizer"] == set()  # the BPE definition depends on nothing of the package


def test_each_module_imports_first():
    """In one fresh interpreter: for each module, forget every project module, then import that one first."""
    script = (
        "import importlib, sys\n"
        "done = []\n"
        f"for name in {MODULES!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('data_pipeline', 'common')]:\n"
        "        del sys.modules[loaded]\n"
        "    done.append(importlib.import_module(name).__name__)\n"
        "print('imported', len(done))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"imported {len(MODULES)}"
