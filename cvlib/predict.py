"""Batch scoring: top-k predictions for every file, one row per file, readable or not."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvlib.imageio import ImageReadError, claims_image, load_rgb
from cvlib.models import pick_device
from cvlib.parquet import write_table_atomic
from cvlib.transforms import eval_preset_from

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("top1_label", pa.string()),
        ("top1_index", pa.int32()),
        ("top1_prob", pa.float32()),
        ("top5_labels", pa.list_(pa.string())),
        ("top5_indices", pa.list_(pa.int32())),
        ("top5_probs", pa.list_(pa.float32())),
        ("model_uri", pa.string()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


def list_input_files(root: str | os.PathLike[str]) -> list[str]:
    """Every non-hidden file under ``root`` that claims to be an image (accepted format or not),
    sorted, relative to root. Files whose content turns out not to be usable still get a row
    (with an error): nothing that looks like an input is dropped.
    """
    root = Path(root)
    if root.is_file():
        return [root.name]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and claims_image(name):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


@dataclass
class _Item:
    index: int
    tensor: torch.Tensor | None
    sha256: str | None
    nbytes: int
    width: int | None
    height: int | None
    status: str
    error: str | None


class ScoringDataset(Dataset):
    """Reads, hashes and preprocesses in DataLoader workers; failures travel as items, so a bad
    file becomes an error row instead of stopping the run or shifting rows."""

    def __init__(self, root: Path, files: Sequence[str], transform, draft_size: int) -> None:
        self.root, self.files, self.transform = root, list(files), transform
        self.draft = (draft_size, draft_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> _Item:
        full = self.root / self.files[i] if self.root.is_dir() else self.root
        try:
            data = full.read_bytes()
        except OSError as exc:
            return _Item(i, None, None, 0, None, None, "unreadable", f"{full}: {exc.strerror or exc}")
        digest = hashlib.sha256(data).hexdigest()
        try:
            img = load_rgb(data, draft_size=self.draft)
            w, h = img.size
            return _Item(i, self.transform(img), digest, len(data), w, h, "ok", None)
        except ImageReadError as exc:
            return _Item(i, None, digest, len(data), None, None, exc.reason, f"{self.files[i]}: {exc.message}")


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def score_folder(
    model: nn.Module,
    meta: dict,
    root: str | os.PathLike[str],
    *,
    files: Sequence[str] | None = None,
    model_uri: str = "",
    model_version: str = "",
    batch_size: int = 64,
    top_k: int = 5,
    num_workers: int = 2,
    device: str = "auto",
) -> pd.DataFrame:
    """Score every file; the frame has exactly one row per file, in input order."""
    root = Path(root)
    files = list_input_files(root) if files is None else list(files)
    dev = pick_device(device)
    model = model.to(dev).eval()
    class_names = list(meta["class_names"])
    k = min(top_k, len(class_names))
    pre = meta["preprocessing"]
    ds = ScoringDataset(root, files, eval_preset_from(pre), draft_size=int(pre["resize_size"]))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    rows: list[dict | None] = [None] * len(files)
    now = datetime.now(timezone.utc)
    with torch.inference_mode():
        for items in loader:
            good = [it for it in items if it.tensor is not None]
            position = {it.index: j for j, it in enumerate(good)}
            if good:
                batch = torch.stack([it.tensor for it in good]).to(dev)
                probs = torch.softmax(model(batch).float(), dim=1)
                p, idx = probs.topk(k, dim=1)
                p, idx = p.cpu().numpy(), idx.cpu().numpy()
            for it in items:
                row = {
                    "path": files[it.index],
                    "sha256": it.sha256,
                    "bytes": it.nbytes,
                    "width": it.width,
                    "height": it.height,
                    "status": it.status,
                    "error": it.error,
                    "top1_label": None,
                    "top1_index": None,
                    "top1_prob": None,
                    "top5_labels": None,
                    "top5_indices": None,
                    "top5_probs": None,
                    "model_uri": model_uri,
                    "model_version": model_version,
                    "scored_at": now,
                }
                if it.tensor is not None:
                    j = position[it.index]
                    labels = [class_names[c] for c in idx[j]]
                    row.update(
                        top1_label=labels[0],
                        top1_index=int(idx[j][0]),
                        top1_prob=float(p[j][0]),
                        top5_labels=labels,
                        top5_indices=[int(c) for c in idx[j]],
                        top5_probs=[float(x) for x in p[j]],
                    )
                rows[it.index] = row
    missing = [files[i] for i, r in enumerate(rows) if r is None]
    if missing:  # cannot happen unless the loader lost items; never write a silently short file
        raise RuntimeError(f"{len(missing)} files were not scored, e.g. {missing[:3]}")
    return pd.DataFrame(rows, columns=PREDICTIONS_SCHEMA.names)


def write_predictions(df: pd.DataFrame, out: str | os.PathLike[str], *, class_names: list[str], config: dict) -> Path:
    table = pa.Table.from_pandas(df, schema=PREDICTIONS_SCHEMA, preserve_index=False)
    return write_table_atomic(table, out, metadata={"visionflow.class_names": class_names, "visionflow.scoring": config})


def predict_sources(
    model: nn.Module, meta: dict, sources: Sequence[str | bytes], *, top_k: int = 5, batch_size: int = 32
) -> pd.DataFrame:
    """Top-k for in-memory requests (paths or bytes), one row per source; bad inputs get an
    ``error`` and no prediction. Used by the pyfunc model behind ``mlflow models serve``."""
    class_names = list(meta["class_names"])
    k = min(top_k, len(class_names))
    preset = eval_preset_from(meta["preprocessing"])
    draft = (int(meta["preprocessing"]["resize_size"]),) * 2
    rows: list[dict] = []
    tensors: list[tuple[int, torch.Tensor]] = []
    for i, src in enumerate(sources):
        rows.append({"status": "ok", "error": None, "top1_label": None, "top1_prob": None, "top5_labels": None, "top5_probs": None})
        try:
            tensors.append((i, preset(load_rgb(src, draft_size=draft))))
        except ImageReadError as exc:
            rows[i].update(status=exc.reason, error=str(exc))
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            chunk = tensors[start : start + batch_size]
            probs = torch.softmax(model(torch.stack([t for _, t in chunk])).float(), dim=1)
            p, idx = probs.topk(k, dim=1)
            for (i, _), pi, ii in zip(chunk, p.tolist(), idx.tolist(), strict=True):
                rows[i].update(
                    top1_label=class_names[ii[0]],
                    top1_prob=pi[0],
                    top5_labels=[class_names[c] for c in ii],
                    top5_probs=pi,
                )
    return pd.DataFrame(rows)
