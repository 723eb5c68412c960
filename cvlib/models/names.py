"""What a model is called, readable without importing torch: the commands check their inputs
with these before any heavy import."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

# Architectures visionflow builds itself (cvlib.models.factory.CUSTOM_ARCHS holds their builders).
CUSTOM_ARCH_NAMES = ("simple_cnn",)

# A model package folder: safetensors weights and the JSON metadata that describes them.
PACKAGE_WEIGHTS = "model.safetensors"
PACKAGE_META = "visionflow.json"


def check_model_path(path: str | os.PathLike[str]) -> Path:
    """Fail at once, naming the path, on what cannot be a model: a file that is no checkpoint
    (``torch.save`` writes a zip archive) or a folder without a package's metadata. Reads no
    weights, so a command can check its inputs before it starts any work."""
    p = Path(path)
    if p.is_dir():
        if next(iter(p.rglob(PACKAGE_META)), None) is None:
            raise ValueError(f"{p} holds no {PACKAGE_META}: not a visionflow model package")
    elif not p.is_file():
        raise FileNotFoundError(f"model {p} does not exist")
    elif not zipfile.is_zipfile(p):
        raise ValueError(f"{p} is not a visionflow checkpoint (best.pt or last.pt written by training) or model package folder")
    return p
