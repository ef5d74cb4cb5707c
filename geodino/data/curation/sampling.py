"""Balanced hierarchical sampling (Vo et al. 2024, arXiv 2405.15613, section 3) over a `ClusterTree`.

N items are split over the top-level clusters by water-filling (`water_fill`: the largest cut c with
sum_i min(c, size_i) <= N; clusters smaller than c give everything, the remainder goes one each, at random,
to clusters larger than c), then recursively over each cluster's children; leaves give random points
('r') or the points nearest their centroid ('c') (`balanced_sample`).
"""

from __future__ import annotations

import logging

import numpy as np

from geodino.data.curation.kmeans import ClusterTree

log = logging.getLogger("geodino")


def water_fill(sizes, n: int, rng: np.random.Generator) -> np.ndarray:
    """Split `n` over groups of `sizes`: the largest cut c with sum(min(c, size)) <= n, then the
    remainder one each to randomly chosen groups larger than c. Returns the count per group."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(n)
    if n >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # f(lo) <= n < f(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= n:
            lo = mid
        else:
            hi = mid
    out = np.minimum(sizes, lo)
    rem = n - int(out.sum())
    if rem:
        big = np.flatnonzero(sizes > lo)  # len(big) > rem because f(lo + 1) > n
        out[rng.choice(big, size=rem, replace=False)] += 1
    return out


def balanced_sample(tree: ClusterTree, n: int, strategy: str = "r", seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` points drawn by balanced hierarchical sampling (see the module doc).

    strategy 'r' takes random points in each leaf cluster, 'c' the points nearest its centroid.
    When `n` is at least the number of points, every point is returned.
    """
    if strategy not in ("r", "c"):
        raise ValueError(f"strategy must be 'r' (random) or 'c' (closest to the centroid), got '{strategy}'")
    rng = np.random.default_rng(seed)
    N = tree.n_points
    if n >= N:
        log.info("balanced sampling: %d requested, the pool has %d; taking everything", n, N)
        return np.arange(N)
    sizes = [tree.sizes(l) for l in range(tree.n_levels)]
    share = water_fill(sizes[-1], n, rng)
    for l in range(tree.n_levels - 1, 0, -1):
        parent = tree.labels[l]  # level-(l-1) cluster -> level-l cluster
        child_share = np.zeros(len(parent), dtype=np.int64)
        order = np.argsort(parent, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(parent, minlength=len(share)))]
        for p in np.flatnonzero(share):
            kids = order[bounds[p]:bounds[p + 1]]
            child_share[kids] = water_fill(sizes[l - 1][kids], share[p], rng)
        share = child_share
    lab = tree.labels[0]
    key = tree.distances if strategy == "c" else rng.random(N)
    order = np.lexsort((key, lab))
    starts = np.r_[0, np.cumsum(np.bincount(lab, minlength=len(share)))][:-1]
    leaf = np.repeat(np.arange(len(share)), share)
    offset = np.arange(len(leaf)) - np.repeat(np.cumsum(share) - share, share)
    return np.sort(order[starts[leaf] + offset])
