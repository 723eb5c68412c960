"""Train/val/test splits decided by content, not by position.

Each image's split depends on nothing but its own key (its content hash, or its near-duplicate
group's), which keeps splits stable as the data set grows and keeps a copy of an image on the
same side of the train/val boundary as the image itself.
"""

from __future__ import annotations

import hashlib

import numpy as np

from cvlib.data.options import DataConfig


def split_for(sha256: str, cfg: DataConfig) -> str:
    """Deterministic split from content: a uniform number in [0, 1) per (salt, hash).

    Each image's split depends on nothing but its own key, which is what makes the split stable
    as images are added, and stratified in expectation: every class gets the configured
    fractions independently (exactly only in the limit; a class of 5 images may get no val).
    """
    u = int.from_bytes(hashlib.sha256(f"{cfg.split_salt}:{sha256}".encode()).digest()[:8], "big") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def assign_splits(status: np.ndarray, sha: np.ndarray, key: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The split of every row: a usable file's comes from its key; an exact duplicate takes the
    split of the copy that was kept (the same bytes, so the same key); a quarantined file none."""
    n = len(status)
    ok = status == "ok"
    key_of_sha = {sha[i]: key[i] for i in np.flatnonzero(ok)}
    split = np.full(n, None, dtype=object)
    for i in range(n):
        if status[i] == "ok":
            split[i] = split_for(key[i], cfg)
        elif status[i] == "duplicate":
            split[i] = split_for(key_of_sha.get(sha[i], sha[i]), cfg)
    return split
