"""Train/val/test splits decided by content, not by position.

Each image's split depends on nothing but its own key (its content hash, or its near-duplicate
group's), which keeps splits stable as the data set grows and keeps a copy of an image on the
same side of the train/val boundary as the image itself.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from cvlib.data.options import DataConfig


def _uniform_many(keys, cfg: DataConfig) -> np.ndarray:
    """A uniform number in [0, 1) per key: the first 8 bytes of SHA-256(salt:key), big-endian,
    over 2**64. One hash per key is the rule; the heads are read as one uint64 array."""
    sha256, salt = hashlib.sha256, f"{cfg.split_salt}:"
    heads = b"".join([sha256(f"{salt}{k}".encode()).digest()[:8] for k in keys])
    return np.frombuffer(heads, dtype=">u8").astype(np.float64) / 2**64


def _splits_of(u: np.ndarray, test_fraction: float, val_fraction: float) -> np.ndarray:
    """The split of each uniform number: test below ``test_fraction``, then val, then train."""
    out = np.full(len(u), "train", dtype=object)
    out[u < test_fraction + val_fraction] = "val"
    out[u < test_fraction] = "test"
    return out


def _split_of_key(key: str, cfg: DataConfig, test_fraction: float, val_fraction: float) -> str:
    return str(_splits_of(_uniform_many([key], cfg), test_fraction, val_fraction)[0])


def split_for(sha256: str, cfg: DataConfig) -> str:
    """Deterministic split from content: a uniform number in [0, 1) per (salt, hash).

    Each image's split depends on nothing but its own key, which is what makes the split stable
    as images are added, and stratified in expectation: every class gets the configured
    fractions independently (exactly only in the limit; a class of 5 images may get no val).
    """
    return _split_of_key(sha256, cfg, cfg.test_fraction, cfg.val_fraction)


def carve_from_train(key: str, cfg: DataConfig, given: frozenset[str]) -> str:
    """The split of a file its folder puts in train: train, unless a split no folder gives (no
    ``val/`` folder, say) is taken out of train by the content hash at its configured fraction.
    The same uniform number as :func:`split_for`, so the rule is the same one."""
    return _split_of_key(key, cfg, *_train_fractions(cfg, given))


def _train_fractions(cfg: DataConfig, given: frozenset[str]) -> tuple[float, float]:
    """(test, val) fractions carved out of a given train folder: none for a split a folder gives."""
    return 0.0 if "test" in given else cfg.test_fraction, 0.0 if "val" in given else cfg.val_fraction


def assign_splits(
    status: np.ndarray, sha: np.ndarray, key: np.ndarray, cfg: DataConfig, given: np.ndarray | None = None
) -> np.ndarray:
    """The split of every row: a usable file's comes from its key; an exact duplicate takes the
    split of the copy that was kept (the same bytes, so the same key); a quarantined file none.

    ``given`` (per row, None outside split folders): the split a split folder gives. Such a file
    keeps it (train may lose a share to a split no folder gives, see :func:`carve_from_train`).
    A file outside the split folders whose near-duplicate group has a member with a given split
    follows that member (the first in row order), so the hash never puts a copy of a val image in
    train; otherwise its key decides as usual.
    """
    n = len(status)
    given = np.full(n, None, dtype=object) if given is None else given
    has_given = pd.notna(given) if n else np.zeros(0, dtype=bool)
    present = frozenset(given[has_given])
    used = (status == "ok") | (status == "duplicate")
    split = np.full(n, None, dtype=object)
    follow: dict[str, str] = {}
    inside = np.flatnonzero(used & has_given)  # files in split folders keep theirs; train may lose a share
    split[inside] = given[inside]
    train = inside[given[inside] == "train"]
    if len(train):
        codes, keys = pd.factorize(key[train])
        split[train] = _splits_of(_uniform_many(keys, cfg), *_train_fractions(cfg, present))[codes]  # carve_from_train, array-wide
    for i in inside[::-1]:  # the first member (in row order) of each key is the one followed
        follow[key[i]] = split[i]
    # The rest, array-wide: each distinct key is hashed once (a near-duplicate group shares one).
    free = np.flatnonzero((status == "ok") & ~has_given)
    if len(free):
        codes, keys = pd.factorize(key[free])
        by_key = _splits_of(_uniform_many(keys, cfg), cfg.test_fraction, cfg.val_fraction)
        if follow:  # groups with a member in a split folder follow it
            for j, k in enumerate(keys):
                if k in follow:
                    by_key[j] = follow[k]
        split[free] = by_key[codes]
    ok = np.flatnonzero(status == "ok")
    first = pd.Series(split[ok], index=pd.Index(sha[ok], dtype=object), dtype=object)
    first = first[~first.index.duplicated(keep="first")]
    dup = np.flatnonzero((status == "duplicate") & ~has_given)
    if len(dup):  # outside the split folders: the kept copy's split (same bytes, same key)
        kept = first.reindex(pd.Index(sha[dup], dtype=object)).to_numpy()
        for j, i in enumerate(dup):
            split[i] = kept[j] if isinstance(kept[j], str) else (follow.get(key[i]) or split_for(key[i], cfg))
    return split
