"""The layering rule from DESIGN.md: cvlib is a pure library; importing any of its modules must
not pull in Prefect or MLflow (tasks/ and flows/ own those).

Checked in a fresh interpreter: in the test process other tests may already have imported them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, pkgutil, sys, importlib
import cvlib
names = sorted(m.name for m in pkgutil.walk_packages(cvlib.__path__, "cvlib."))
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "mlflow"))
print(json.dumps({"modules": names, "leaked": leaked}))
"""


def test_cvlib_imports_neither_prefect_nor_mlflow():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The walk must have found the real modules, or the check below proves nothing.
    expected = {
        "cvlib.config", "cvlib.data.ingest", "cvlib.training.fit", "cvlib.inference.predict", "cvlib.training.checkpoint",
        "cvlib.explain.screening", "cvlib.models.factory", "cvlib.training.schedule", "cvlib.data.transforms", "cvlib.data.demo",
    }  # fmt: skip
    assert expected <= set(report["modules"])
    assert report["leaked"] == []


def _imports(layer: str) -> dict[str, set[str]]:
    """{module: the modules it imports, anywhere in its body}, for every module of ``layer``."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / layer).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
        graph[name] = found
    return graph


def test_imports_run_one_way():
    """cvlib <- tasks <- flows <- deployments, counting imports inside functions too."""
    below = {"cvlib": ("tasks", "flows", "deployments", "prefect", "mlflow"), "tasks": ("flows", "deployments"),
             "flows": ("deployments",)}  # fmt: skip
    wrong = [
        f"{module} imports {imported}"
        for layer, forbidden in below.items()
        for module, imports in _imports(layer).items()
        for imported in imports
        if imported.split(".")[0] in forbidden
    ]
    assert wrong == []


def test_cvlib_has_no_import_cycle():
    graph = _imports("cvlib")
    edges = {m: {i for i in imports if i in graph and i != m and not m.startswith(i + ".")} for m, imports in graph.items()}
    # A package's __init__ importing its own modules is not a cycle; edges into a package are.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40  # the walk found the real modules
    assert cycles == []
