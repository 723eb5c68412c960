"""Near-duplicate grouping by perceptual hash: the array algorithm agrees with the plain
pair-by-pair definition, in sparse and in crowded buckets, and names each group by its smallest
member."""

from __future__ import annotations

import itertools

import numpy as np

from cvlib.data.near_duplicates import near_duplicate_groups


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
