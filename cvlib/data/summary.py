"""What a manifest says about the data set as a whole: the counts a person wants to see after
ingestion, and whether it can be trained on at all.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from cvlib.data.layout import layout_note
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
    if not (ok["split"] == "train").any():
        raise DataSetError("the training split is empty: every usable image was held out; add images to train")
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
        "layout": layout(manifest),
        "leakage": leakage(manifest),
    }


def _given(manifest: pd.DataFrame) -> pd.Series:
    if "given_split" not in manifest:
        return pd.Series([None] * len(manifest), index=manifest.index, dtype=object)
    return manifest["given_split"].where(manifest["given_split"].notna(), None)


def layout(manifest: pd.DataFrame) -> dict:
    """How the splits were decided: ``kind`` (class_folders / split_folders), the split folders
    found (folder name -> split) and a one-line ``note`` for people."""
    given = _given(manifest)
    inside = given.notna()
    folders = {str(p).split("/", 1)[0]: str(g) for p, g in zip(manifest["path"][inside], given[inside], strict=True)}
    hashed = int(((manifest["status"] == "ok") & ~inside).sum()) if folders else 0
    return {
        "kind": "split_folders" if folders else "class_folders",
        "split_folders": folders,
        "note": layout_note(folders, hashed),
    }


def leakage(manifest: pd.DataFrame, examples: int = 5) -> dict:
    """The same picture on both sides of a split boundary.

    ``exact``: byte-identical copies in different given split folders (only the first copy in path
    order is used, so the other split silently loses the file). ``near_groups``/``near_files``:
    near-duplicate groups whose usable members are in different splits: both are trained or
    evaluated on, so validation measures memory. Never happens when the hash decides (a group
    shares a split); with given splits it is the data set's own leakage, reported, not repaired.
    """
    given = _given(manifest)
    given_of = dict(zip(manifest["path"].astype(str), given, strict=True))
    exact = []
    dup = manifest["status"] == "duplicate"
    for path, of, g in zip(manifest["path"][dup], manifest["duplicate_of"][dup], given[dup], strict=True):
        other = given_of.get(str(of))
        if g is not None and other is not None and other != g:
            exact.append(f"{path} = {of}")
    ok = manifest[manifest["status"] == "ok"]
    near = ok["near_duplicate_of"] if "near_duplicate_of" in ok else pd.Series([], dtype=object)
    split_of = dict(zip(ok["path"].astype(str), ok["split"], strict=True))
    groups: dict[str, set[str]] = {}
    members: dict[str, list[str]] = {}
    for path, leader in zip(ok["path"][near.notna()], near[near.notna()], strict=True):
        groups.setdefault(str(leader), {split_of.get(str(leader))}).add(split_of[str(path)])
        members.setdefault(str(leader), [str(leader)]).append(str(path))
    crossing = [leader for leader, splits in groups.items() if len(splits - {None}) > 1]
    return {
        "exact": len(exact),
        "near_groups": len(crossing),
        "near_files": sum(len(members[leader]) for leader in crossing),
        "examples": exact[:examples] + [" ~ ".join(members[leader]) for leader in crossing[:examples]],
    }
