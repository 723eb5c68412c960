"""Near-duplicate grouping by perceptual hash: the array algorithm agrees with the plain
pair-by-pair definition, in sparse and in crowded buckets, and names each group by its smallest
member."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvlib.data.manifest import columns_to_manifest
from cvlib.data.near_duplicates import near_duplicate_groups
from cvlib.data.options import DataConfig
from cvlib.data.splits import split_for


def test_near_duplicate_groups_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.uint64)
    flips = [np.uint64(1) << np.uint64(b) for b in rng.integers(0, 64, size=200)]
    hashes = np.concatenate([base, [base[i % 40] ^ f for i, f in enumerate(flips)], base[:5]])
    n = len(hashes)
    for distance in (0, 1, 3, 4, 6):
        got = near_duplicate_groups(hashes, distance)
        want = _brute_force_groups([int(h) for h in hashes], distance)
        for i in range(n):
            for j in range(n):
                assert (got[i] == got[j]) == (want[i] == want[j]), (distance, i, j)


def test_near_duplicate_groups_match_brute_force_in_crowded_buckets():
    """Low-entropy hashes put dozens of values in one block bucket: the pair-by-pair path."""
    rng = np.random.default_rng(3)
    low, high = rng.integers(0, 2**10, size=300, dtype=np.uint64), rng.integers(0, 3, size=300, dtype=np.uint64)
    hashes = low | (high << np.uint64(50))
    for distance in (1, 2, 4):
        got = near_duplicate_groups(hashes, distance)
        want = _brute_force_groups([int(h) for h in hashes], distance)
        same_got = got[:, None] == got[None, :]
        same_want = np.array(want)[:, None] == np.array(want)[None, :]
        assert (same_got == same_want).all(), distance


def test_near_duplicate_group_id_is_the_smallest_member():
    hashes = np.array([0b1111, 0b0111, 1 << 40, 0b0011, (1 << 40) | 1], dtype=np.uint64)
    # distinct hashes in sorted order: 3, 7, 15, 2**40, 2**40 + 1
    assert near_duplicate_groups(hashes, 1).tolist() == [0, 0, 3, 0, 3]
    assert near_duplicate_groups(hashes, 0).tolist() == [2, 1, 3, 0, 4]
    assert near_duplicate_groups(np.array([], dtype=np.uint64), 4).tolist() == []


def _brute_force_groups(hashes: list[int], distance: int) -> list[int]:
    parent = list(range(len(hashes)))

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for i, j in itertools.combinations(range(len(hashes)), 2):
        if (hashes[i] ^ hashes[j]).bit_count() <= distance:
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(hashes))]


def _counting_comparisons(monkeypatch) -> list[int]:
    """How many pairs of hashes are compared (every comparison goes through _popcount64)."""
    from cvlib.data import near_duplicates

    seen: list[int] = []
    real = near_duplicates._popcount64
    monkeypatch.setattr(near_duplicates, "_popcount64", lambda x: seen.append(int(x.size)) or real(x))
    return seen


def test_a_crowd_of_near_identical_hashes_is_not_compared_pair_by_pair(monkeypatch):
    """2,016 distinct hashes two bits from one centre (a burst of near-identical pictures): every
    block bucket holds nearly all of them. Pair by pair that is 5 blocks x 2M comparisons (8.4M
    in all, measured); the grouping must stay within a bounded number per hash (here: the crowd's
    search, plus the small buckets of ~50 hashes, one per flipped bit, compared pair by pair)."""
    rng = np.random.default_rng(5)
    centre = np.uint64(rng.integers(0, 2**63, dtype=np.uint64))
    crowd = [centre ^ (np.uint64(1) << np.uint64(i)) ^ (np.uint64(1) << np.uint64(j)) for i, j in itertools.combinations(range(64), 2)]
    far = rng.integers(0, 2**63, size=50, dtype=np.uint64)  # unrelated pictures beside the crowd
    hashes = np.concatenate([np.array(crowd, dtype=np.uint64), far])
    comparisons = _counting_comparisons(monkeypatch)
    groups = near_duplicate_groups(hashes, 4)
    n = len(hashes)
    assert sum(comparisons) < 100 * n, sum(comparisons)  # bounded per hash, not n * n
    assert len(set(groups[: len(crowd)].tolist())) == 1  # the whole crowd is one group
    assert len(set(groups[len(crowd) :].tolist())) == len(far)  # the others stay apart


def test_crowded_bucket_search_matches_brute_force_with_several_groups():
    """Crowds, chains and loners sharing one block: the breadth-first search finds exactly the
    transitive groups of the pair-by-pair definition."""
    rng = np.random.default_rng(11)
    values = []
    for _ in range(6):  # six crowds around random centres, all with the same low 12 bits
        centre = int(rng.integers(0, 2**52)) << 12
        values += [centre ^ (1 << int(b)) ^ (1 << int(c)) for b, c in rng.integers(12, 64, size=(60, 2))]
    chain = int(rng.integers(0, 2**52)) << 12
    for step in range(20):  # a chain: each link 3 bits from the last, the ends far apart
        chain ^= 0b111 << (12 + 2 * step)
        values.append(chain)
    values += [int(v) << 12 for v in rng.integers(0, 2**52, size=40)]
    hashes = np.array(values, dtype=np.uint64)
    for distance in (2, 3, 4):
        got = near_duplicate_groups(hashes, distance)
        want = np.array(_brute_force_groups([int(h) for h in hashes], distance))
        assert ((got[:, None] == got[None, :]) == (want[:, None] == want[None, :])).all(), distance


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from(["a", "b"]), st.integers(0, 5), st.booleans()),
        min_size=1, max_size=40,
    )
)  # fmt: skip
def test_group_decisions_follow_their_plain_definitions(rows):
    """columns_to_manifest makes its group decisions with integer codes and sorts; each must
    match its row-by-row definition: label conflicts, the first copy kept, a near-duplicate
    group's leader (smallest hash, then first row), and the split of the leader's hash."""
    cfg = DataConfig(val_fraction=0.3, test_fraction=0.2)
    n = len(rows)
    shas = [hashlib.sha256(bytes([s])).hexdigest() for s, _, _, _ in rows]
    # pHashes: a few bits apart within each of two families, far apart between them
    phashes = [None if not has else f"{(0xF0F0F0F0F0F0F0F0 if p < 3 else 0x0F0F0F0F0F0F0F0F) ^ (1 << p):016x}"
               for _, _, p, has in rows]  # fmt: skip
    cols = {
        "path": np.array([f"{label}/{i:03d}.jpg" for i, (_, label, _, _) in enumerate(rows)], dtype=object),
        "label": np.array([label for _, label, _, _ in rows], dtype=object),
        "sha256": np.array(shas, dtype=object), "phash": np.array(phashes, dtype=object),
        "reason": np.full(n, None, dtype=object), "detail": np.full(n, None, dtype=object),
        "given_split": np.full(n, None, dtype=object), "format": np.full(n, "JPEG", dtype=object),
        "mode": np.full(n, "RGB", dtype=object), "bytes": np.ones(n, dtype=np.int64),
        "mtime_ns": np.ones(n, dtype=np.int64), "width": np.full(n, 8), "height": np.full(n, 8), "n_frames": np.ones(n),
    }  # fmt: skip
    m = columns_to_manifest(cols, cfg, presorted=True)

    labels_of: dict[str, set[str]] = {}
    for sha, (_, label, _, _) in zip(shas, rows, strict=True):
        labels_of.setdefault(sha, set()).add(label)
    status = ["quarantined" if len(labels_of[s]) > 1 else "ok" for s in shas]
    first: dict[str, int] = {}
    duplicate_of: list[str | None] = [None] * n
    for i, s in enumerate(shas):
        if status[i] == "ok" and s in first:
            status[i], duplicate_of[i] = "duplicate", cols["path"][first[s]]
        elif status[i] == "ok":
            first[s] = i
    assert list(m["status"]) == status
    assert [None if pd.isna(x) else x for x in m["duplicate_of"]] == duplicate_of

    hashed = [i for i in range(n) if status[i] == "ok" and phashes[i] is not None]
    group = near_duplicate_groups(np.array([int(phashes[i], 16) for i in hashed], dtype=np.uint64), 4) if hashed else []
    key, near = list(shas), [None] * n
    for g in set(group):
        members = [i for i, gi in zip(hashed, group, strict=True) if gi == g]
        if len({shas[i] for i in members}) < 2:
            continue  # copies of one content: exact duplicates, not near ones
        leader = min(members, key=lambda i: (shas[i], i))
        for i in members:
            key[i] = shas[leader]
            near[i] = None if i == leader else cols["path"][leader]
    assert [None if pd.isna(x) else x for x in m["near_duplicate_of"]] == near
    ok = [i for i in range(n) if status[i] == "ok"]
    assert [m["split"].iloc[i] for i in ok] == [split_for(key[i], cfg) for i in ok]
