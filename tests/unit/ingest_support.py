"""Small generated images and manifest lookups shared by the ingestion tests (scan, reading,
manifest, summary), so each test file builds its folders the same way."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cvlib.data.options import DataConfig
from cvlib.data.verdicts import REASONS


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A smooth random scene, different for every seed (so never a near-duplicate by chance)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((5, 6, 3)) * 255).astype(np.uint8))
    return low.resize(size, Image.Resampling.BICUBIC)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes | Image.Image, fmt: str = "JPEG") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(encode(data, fmt) if isinstance(data, Image.Image) else data)
    return p


def make_classes(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    for k, (label, n) in enumerate(per_class.items()):
        for i in range(n):
            put(root, f"{label}/img_{i:03d}.jpg", picture(seed + 1000 * k + i))


def row(manifest: pd.DataFrame, path: str) -> pd.Series:
    found = manifest[manifest["path"] == path]
    assert len(found) == 1, (path, list(manifest["path"]))
    return found.iloc[0]


def assert_verdict(manifest: pd.DataFrame, path: str, status: str, reason: str | None) -> pd.Series:
    r = row(manifest, path)
    assert (r["status"], None if pd.isna(r["reason"]) else r["reason"]) == (status, reason), r.to_dict()
    if status == "quarantined":
        assert reason in REASONS
        assert isinstance(r["detail"], str) and r["detail"], "a quarantined file must say why"
        assert pd.isna(r["split"]), "a quarantined file takes no split"
    return r


def ingest_config() -> DataConfig:
    """Small classes allowed, a quarter held out for validation, no test split."""
    return DataConfig(val_fraction=0.25, test_fraction=0.0, min_images_per_class=2)
