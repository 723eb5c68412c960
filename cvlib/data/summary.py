"""What a manifest says about the data set as a whole: the counts a person wants to see after
ingestion, and whether it can be trained on at all.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from cvlib.data.options import DataConfig
from cvlib.data.verdicts import DataSetError


def check_trainable(manifest: pd.DataFrame, cfg: DataConfig) -> None:
    """Fail fast, naming the class, when the data cannot support training."""
    ok = manifest[manifest["status"] == "ok"]
    all_labels = sorted({str(x) for x in manifest["label"].dropna()})
    counts = ok["label"].astype(str).value_counts().reindex(all_labels, fill_value=0)
    small = counts[counts < cfg.min_images_per_class]
    if len(small):
        parts = []
        for name, n in small.items():
            bad = manifest[(manifest["label"] == name) & (manifest["status"] == "quarantined")]
            why = bad["reason"].value_counts()
            note = f" ({len(bad)} quarantined: {', '.join(f'{r} x{c}' for r, c in why.items())})" if len(bad) else ""
            parts.append(f"{name!r} has {n}{note}")
        raise DataSetError(
            f"classes with fewer than {cfg.min_images_per_class} usable images: {'; '.join(parts)}. "
            "Add images, remove the class folder, or lower min_images_per_class."
        )
    if len(counts) < 2:
        raise DataSetError(f"need at least two classes with usable images, found {len(counts)}: {list(counts.index)}")
    if cfg.val_fraction > 0 and not (ok["split"] == "val").any():
        raise DataSetError("the validation split is empty; add images or raise val_fraction")


def _stats(values: pd.Series) -> dict[str, float]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": int(v.min()), "median": float(v.median()), "max": int(v.max())}


def summarize(manifest: pd.DataFrame) -> dict:
    """Counts a person wants to see after ingestion (and a Prefect artifact can show)."""
    ok = manifest[manifest["status"] == "ok"]
    per_class = ok.groupby(["label", "split"]).size().unstack(fill_value=0)
    counts = ok["label"].value_counts()
    all_labels = sorted({str(x) for x in manifest["label"].dropna()})
    near = manifest["near_duplicate_of"] if "near_duplicate_of" in manifest else pd.Series([], dtype=object)
    near_rows = manifest[near.notna()] if len(near) else manifest.iloc[0:0]
    groups: dict[str, set[str]] = {}
    group_sizes: Counter[str] = Counter()
    for _, row in near_rows.iterrows():
        leader = str(row["near_duplicate_of"])
        groups.setdefault(leader, set()).add(str(row["label"]))
        group_sizes[leader] += 1
    label_of = dict(zip(manifest["path"].astype(str), manifest["label"].astype(str), strict=True))
    cross = sum(1 for leader, labs in groups.items() if len(labs | {label_of.get(leader, "")}) > 1)
    return {
        "files": len(manifest),
        "ok": len(ok),
        "duplicates": int((manifest["status"] == "duplicate").sum()),
        "quarantined": int((manifest["status"] == "quarantined").sum()),
        "classes": int(ok["label"].nunique()),
        "class_counts": {str(k): int(v) for k, v in counts.sort_index().items()},
        "empty_classes": [c for c in all_labels if c not in counts.index],
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "per_class": {str(k): {str(s): int(v) for s, v in row.items()} for k, row in per_class.iterrows()},
        "splits": {str(k): int(v) for k, v in ok["split"].value_counts().sort_index().items()},
        "image_size": {"width": _stats(ok["width"]), "height": _stats(ok["height"])},
        "formats": {str(k): int(v) for k, v in ok["format"].value_counts().sort_index().items()},
        "animated": int((pd.to_numeric(ok["n_frames"], errors="coerce").fillna(1) > 1).sum()),
        "near_duplicates": len(near_rows),
        "near_duplicate_groups": len(groups),
        "cross_class_near_duplicate_groups": int(cross),
        "largest_near_duplicate_group": int(max(group_sizes.values()) + 1) if group_sizes else 0,
        "reasons": {str(k): int(v) for k, v in manifest["reason"].dropna().value_counts().sort_index().items()},
    }
