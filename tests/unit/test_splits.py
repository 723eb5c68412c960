"""Splits from content: adding images never moves an existing one, and every class gets the
configured fractions."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvlib.data.manifest import records_to_manifest
from cvlib.data.options import DataConfig
from cvlib.data.splits import assign_splits, split_for
from cvlib.data.verdicts import FileRecord


def _records(hashes: list[str], labels: list[str]) -> list[FileRecord]:
    return [
        FileRecord(f"{lab}/{h[:12]}.jpg", lab, h, 100, 1, 8, 8, "JPEG", "RGB", 1)
        for h, lab in zip(hashes, labels, strict=True)
    ]


hash_lists = st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=40, unique=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=hash_lists, new=hash_lists, n_classes=st.integers(1, 4), salt=st.text(max_size=5))
def test_adding_images_never_moves_an_existing_one(old, new, n_classes, salt):
    cfg = DataConfig(val_fraction=0.3, test_fraction=0.2, split_salt=salt)
    digest = [hashlib.sha256(b).hexdigest() for b in old + [b for b in new if b not in old]]
    labels = [f"c{int(h, 16) % n_classes}" for h in digest]
    before = records_to_manifest(_records(digest[: len(old)], labels[: len(old)]), cfg)
    after = records_to_manifest(_records(digest, labels), cfg)
    merged = before.merge(after, on="path", suffixes=("_before", "_after"))
    assert len(merged) == len(before)
    assert (merged["split_before"] == merged["split_after"]).all()


def test_splits_are_stratified_and_follow_the_fractions():
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.1)
    rng = np.random.default_rng(1)
    hashes = [hashlib.sha256(rng.bytes(8)).hexdigest() for _ in range(3000)]
    labels = ["a"] * 1500 + ["b"] * 1000 + ["c"] * 500
    m = records_to_manifest(_records(hashes, labels), cfg)
    share = m.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert ((share["val"] - 0.2).abs() < 0.05).all(), share
    assert ((share["test"] - 0.1).abs() < 0.04).all(), share
    assert split_for(hashes[0], cfg) == split_for(hashes[0], DataConfig(val_fraction=0.2, test_fraction=0.1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60),
       val=st.floats(0.0, 0.5), test=st.floats(0.0, 0.4), salt=st.text(max_size=5))  # fmt: skip
def test_array_wide_splits_follow_the_per_key_rule(keys, val, test, salt):
    """assign_splits hashes every distinct key in one pass and picks splits array-wide; each
    row must still get exactly what split_for gives its key (the rule stored splits rely on)."""
    cfg = DataConfig(val_fraction=val, test_fraction=test, split_salt=salt)
    status = np.full(len(keys), "ok", dtype=object)
    key = np.array(keys, dtype=object)
    got = assign_splits(status, key, key, cfg)
    assert list(got) == [split_for(k, cfg) for k in keys]
