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
        "cvlib.explain.report", "cvlib.models.factory", "cvlib.training.schedule", "cvlib.data.transforms", "cvlib.data.demo",
    }  # fmt: skip
    assert expected <= set(report["modules"])
    assert report["leaked"] == []
