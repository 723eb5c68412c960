"""Grouping near-duplicate pictures by their 64-bit perceptual hashes.

Re-encoded, resized or lightly edited copies of a picture have pHashes a few bits apart; they are
grouped (transitively) so the manifest can give every member of a group the same split.
"""

from __future__ import annotations

import itertools

import numpy as np

NEAR_DUPLICATE_DISTANCE = 4  # pHash bits; re-encodes and rescales land at 0-4, see benchmarks/ingest.py
_SMALL_BUCKET = 256  # buckets up to this size are compared pair by pair, all buckets in one array pass per offset
_ALL_PAIRS = 256  # a crowded bucket's pool this small is compared pair by pair (at most 32k pairs)
_LONERS, _LONER_SIZE = 8, 4  # this many searches in a row finding fewer hashes: a sparse bucket, pair by pair
_SLICE_ELEMENTS = 1 << 22  # hash comparisons held at once in a crowded bucket (32 MiB of uint64)


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.astype(">u8").view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


def near_duplicate_groups(hashes: np.ndarray, distance: int) -> np.ndarray:
    """Group 64-bit hashes that are within ``distance`` bits of each other (transitively).

    Returns a group id per hash (the smallest index, among the distinct hashes in sorted order,
    of its group). Candidate pairs come from multi-index hashing: split the 64 bits into
    ``distance + 1`` blocks; two hashes within ``distance`` bits agree exactly on at least one
    block (pigeonhole), so only hashes sharing a block value are compared. That keeps it
    near-linear instead of comparing every pair of a large folder. Everything is array work:
    small buckets (the usual case) are compared all at once, a crowded bucket by a search that
    skips hashes already grouped (:func:`_bucket_tree`), and the groups come from label propagation over the close pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    uniq, inverse = np.unique(hashes, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = len(uniq)
    label = np.arange(n, dtype=np.int64)
    distance = max(0, min(int(distance), 63))
    if distance == 0 or n < 2:
        return label[inverse]
    pairs = _close_pairs(uniq, distance)
    if pairs is not None:
        label = _propagate(label, *pairs)
    return label[inverse]


def _close_pairs(uniq: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Index pairs of the distinct sorted hashes ``uniq`` within ``distance`` bits (None: none)."""
    n = len(uniq)
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []

    def keep_close(a: np.ndarray, b: np.ndarray) -> None:
        close = _popcount64(uniq[a] ^ uniq[b]) <= distance
        if close.any():
            left.append(a[close])
            right.append(b[close])

    bounds = np.linspace(0, 64, distance + 2).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        block = (uniq >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(block, kind="stable")
        sorted_block = block[order]
        starts = np.flatnonzero(np.r_[True, sorted_block[1:] != sorted_block[:-1]])
        sizes = np.diff(np.r_[starts, n])
        # small buckets, all at once: position k against position k + d of the same bucket, for
        # every d; ``left`` is how many positions follow k in its bucket (those with none drop out)
        left_in_bucket = np.repeat(sizes, sizes) - (np.arange(n) - np.repeat(starts, sizes)) - 1
        k = np.flatnonzero((left_in_bucket > 0) & (np.repeat(sizes, sizes) <= _SMALL_BUCKET))
        d = 1
        while len(k):
            keep_close(order[k], order[k + d])
            d += 1
            k = k[left_in_bucket[k] >= d]
        # crowded buckets: a search that never compares two hashes already known to be grouped
        for b in np.flatnonzero(sizes > _SMALL_BUCKET):
            idx = order[starts[b] : starts[b] + sizes[b]]
            a, c = _bucket_tree(uniq[idx], distance)
            left.append(idx[a])
            right.append(idx[c])
    if not left:
        return None
    return np.concatenate(left), np.concatenate(right)


def _all_pairs(values: np.ndarray, positions: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every close pair among ``values[positions]`` (as positions), in slices of bounded memory."""
    sub = values[positions]
    a_out: list[np.ndarray] = []
    b_out: list[np.ndarray] = []
    step = max(1, _SLICE_ELEMENTS // max(len(sub), 1))
    for a in range(0, len(sub), step):
        ii, jj = np.nonzero(_popcount64(sub[a : a + step, None] ^ sub[None, :]) <= distance)
        ii = ii + a
        upper = ii < jj
        a_out.append(positions[ii[upper]])
        b_out.append(positions[jj[upper]])
    return np.concatenate(a_out), np.concatenate(b_out)


def _bucket_tree(values: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges (positions into ``values``) that link exactly the hashes of one crowded bucket that
    are within ``distance`` bits of each other, transitively.

    Comparing every pair is quadratic, and a large crowded bucket is usually a crowd of
    near-identical pictures (blank skies, a burst of frames): thousands of hashes, nearly all
    close. So groups are first grown breadth-first from one hash at a time: each hash reached is
    compared only with the hashes not reached yet, and leaves the pool the first time anything
    reaches it; a crowd then costs about one comparison per hash, not one per pair. Once the
    pool is small (``_ALL_PAIRS``), or searches keep finding only loners (a sparse bucket, where
    one search per hash would be one Python step per hash), the rest is compared pair by pair
    in array slices. That is exact: a finished search has compared its every member with every
    hash still in the pool, so no close pair links the two parts.
    """
    pool = np.arange(len(values))
    parents: list[np.ndarray] = []
    children: list[np.ndarray] = []
    loners = 0
    while len(pool) > _ALL_PAIRS and loners < _LONERS:
        frontier, pool = pool[:1], pool[1:]
        found = 0
        while len(frontier) and len(pool):
            parent = np.full(len(pool), -1, dtype=np.int64)
            step = max(1, _SLICE_ELEMENTS // len(pool))
            for a in range(0, len(frontier), step):
                open_ = np.flatnonzero(parent < 0)
                if not len(open_):
                    break
                f = frontier[a : a + step]
                close = _popcount64(values[f][:, None] ^ values[pool[open_]][None, :]) <= distance
                hit = close.any(axis=0)
                parent[open_[hit]] = f[close[:, hit].argmax(axis=0)]
            reached = parent >= 0
            parents.append(parent[reached])
            children.append(pool[reached])
            found += int(reached.sum())
            frontier, pool = pool[reached], pool[~reached]
        loners = loners + 1 if found < _LONER_SIZE else 0
    if len(pool) > 1:
        a, b = _all_pairs(values, pool, distance)
        parents.append(a)
        children.append(b)
    if not parents:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(parents), np.concatenate(children)


def _propagate(label: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the pairs (a, b) as the smallest index in each, by array-wide label
    propagation (no per-pair Python loop). ``label`` starts as ``arange(n)`` and is updated."""
    while True:  # hook each root onto the smallest root it touches, then flatten
        la, lb = label[a], label[b]
        if np.array_equal(la, lb):
            break
        low = np.minimum(la, lb)
        np.minimum.at(label, la, low)
        np.minimum.at(label, lb, low)
        while True:
            up = label[label]
            if np.array_equal(up, label):
                break
            label = up
    return label
