"""Every test that skips without CUDA carries the ``gpu`` marker, so `pytest -m gpu` on a GPU
machine runs all of them and `-m "not gpu"` leaves none behind as a silent skip."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parents[1]


def _cuda_only(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.skipif") and "cuda" in ast.unparse(decorator)


def _marked_gpu(decorator: ast.expr) -> bool:
    return ast.unparse(decorator).endswith("mark.gpu")


def test_cuda_only_tests_carry_the_gpu_marker():
    unmarked, found = [], 0
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(_cuda_only, node.decorator_list)):
                found += 1
                if not any(map(_marked_gpu, node.decorator_list)):
                    unmarked.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert found >= 4, "the scan finds the CUDA tests"
    assert unmarked == [], f"CUDA-only tests without @pytest.mark.gpu: {unmarked}"
