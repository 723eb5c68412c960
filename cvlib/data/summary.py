"""What a manifest says about the data set as a whole: the counts a person wants to see after
ingestion, and whether it can be trained on at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cvlib.columns import isin
from cvlib.data.layout import layout_note
from cvlib.data.options import DataConfig
from cvlib.data.verdicts import DataSetError


def check_trainable(manifest: pd.DataFrame, cfg: DataConfig) -> None:
    """Fail fast, naming the class, when the data cannot support training."""
    ok = manifest[manifest["status"] == "ok"]
    all_labels = _labels(manifest)
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


def _labels(manifest: pd.DataFrame) -> list[str]:
    """Every class folder's name, sorted (distinct values first: a label repeats per file)."""
    return sorted({str(x) for x in manifest["label"].dropna().unique()})


def _stats(values: pd.Series) -> dict[str, float]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": int(v.min()), "median": float(v.median()), "max": int(v.max())}


_OK_COLUMNS = ("path", "label", "split", "width", "height", "format", "n_frames")


def summarize(manifest: pd.DataFrame) -> dict:
    """Counts a person wants to see after ingestion (and a Prefect artifact can show)."""
    # Only the columns read below: filtering the whole 19-column manifest copies every string column.
    ok = manifest.loc[manifest["status"] == "ok", [c for c in _OK_COLUMNS if c in manifest.columns]]
    per_class = ok.groupby(["label", "split"]).size().unstack(fill_value=0)
    counts = ok["label"].value_counts()
    all_labels = _labels(manifest)
    near = manifest["near_duplicate_of"] if "near_duplicate_of" in manifest else pd.Series([None] * len(manifest), dtype=object)
    followers = near.notna().to_numpy()
    # Group-level counts with group-bys (a crowded data set has tens of thousands of near-duplicates);
    # the columns stay in pandas' own string type: no per-row conversion to Python objects and back.
    leaders = near[followers]
    group_sizes = leaders.value_counts()
    heads = manifest.loc[isin(manifest["path"], group_sizes.index), ["path", "label"]]  # each group's key image
    pairs = pd.DataFrame({
        "leader": np.concatenate([leaders.to_numpy(dtype=object), heads["path"].to_numpy(dtype=object)]),
        "label": np.concatenate([manifest["label"][followers].to_numpy(dtype=object), heads["label"].to_numpy(dtype=object)]),
    }, dtype=object)  # fmt: skip
    cross = int((pairs.groupby("leader")["label"].nunique() > 1).sum()) if len(pairs) else 0
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
        "near_duplicates": int(followers.sum()),
        "near_duplicate_groups": len(group_sizes),
        "cross_class_near_duplicate_groups": int(cross),
        "largest_near_duplicate_group": int(group_sizes.max() + 1) if len(group_sizes) else 0,
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
    dup = (manifest["status"] == "duplicate").to_numpy()
    exact = []
    if dup.any() and given[dup].notna().any():  # only copies inside split folders can cross them
        given_of = pd.Series(given.to_numpy(), index=manifest["path"].astype(str).to_numpy())
        given_of = given_of[~given_of.index.duplicated()]
        other = given_of.reindex(manifest["duplicate_of"][dup].astype(str).to_numpy()).to_numpy()
        mine = given[dup].to_numpy()
        crossed = pd.notna(mine) & pd.notna(other) & (mine != other)
        exact = [f"{p} = {o}" for p, o in zip(manifest["path"][dup][crossed], manifest["duplicate_of"][dup][crossed], strict=True)]
    ok = manifest.loc[manifest["status"] == "ok", [c for c in ("path", "split", "near_duplicate_of") if c in manifest.columns]]
    near = ok["near_duplicate_of"] if "near_duplicate_of" in ok else pd.Series([None] * len(ok), dtype=object, index=ok.index)
    followers = ok[near.notna().to_numpy()]
    if followers.empty:
        return {"exact": len(exact), "near_groups": 0, "near_files": 0, "examples": exact[:examples]}
    leaders = followers["near_duplicate_of"]
    order = pd.unique(leaders.to_numpy(dtype=object))  # groups in order of first appearance
    heads = ok[isin(ok["path"], order)]  # each group's key image (itself never a follower)
    members = pd.DataFrame({
        "leader": np.concatenate([heads["path"].to_numpy(dtype=object), leaders.to_numpy(dtype=object)]),
        "path": np.concatenate([heads["path"].to_numpy(dtype=object), followers["path"].to_numpy(dtype=object)]),
        "split": np.concatenate([heads["split"].to_numpy(dtype=object), followers["split"].to_numpy(dtype=object)]),
    }, dtype=object)  # fmt: skip
    splits = members.dropna(subset=["split"]).groupby("leader", sort=False)["split"].nunique()
    crossing = list(order[splits.reindex(order, fill_value=0).to_numpy() > 1])
    sizes = members.groupby("leader", sort=False).size()
    shown = members[members["leader"].isin(crossing[:examples])]
    paths = shown.groupby("leader", sort=False)["path"].agg(list)
    return {
        "exact": len(exact),
        "near_groups": len(crossing),
        "near_files": int(sizes.reindex(crossing).sum()) if crossing else 0,
        "examples": exact[:examples] + [" ~ ".join(paths[leader]) for leader in crossing[:examples]],
    }
