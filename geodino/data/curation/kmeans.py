"""Resampled hierarchical k-means (Vo et al. 2024, arXiv 2405.15613, section 3) on faiss.

Level 1 clusters the points, level l+1 clusters the centroids of level l. At each level, after a first
k-means, r times: take the s points nearest each centroid, rerun k-means on that more even subset
(warm-started from the current centroids) and reassign every point (`resampled_kmeans`). This spreads the
centroids over the support of the data instead of piling them into dense modes. `hierarchical_kmeans`
stacks the levels into a `ClusterTree` (saved as ``.npz``); `kmeans_plusplus` is an optional seeding.

faiss k-means trains on an in-memory float32 copy of the points it is given: ``max_train_points`` bounds
that copy for level 1 on huge pools (every point is still assigned, in chunks).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from geodino.data.curation.arrays import CHUNK, as_float32, chunks

log = logging.getLogger("geodino")


# ------------------------------------------------------------------------------------------------
# k-means building blocks
# ------------------------------------------------------------------------------------------------

def kmeans_plusplus(x, k: int, seed: int = 0, sample: int | None = None, n_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007) on at most `sample` points of `x`.

    Each new centre is the best (lowest potential) of `n_trials` candidates (default 2 + log k)
    drawn with probability proportional to the squared distance to the nearest centre so far.
    Costs k·n_trials passes over the (sub)sample, so large pools are subsampled.
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    if sample is not None and n > sample:
        pts = as_float32(x[np.sort(rng.choice(n, size=sample, replace=False))])
    else:
        pts = as_float32(x[:])
    m = pts.shape[0]
    trials = int(n_trials or 2 + int(math.log(k)))
    sq = (pts.astype(np.float64) ** 2).sum(1)
    centres = np.empty((k, pts.shape[1]), dtype=np.float32)
    centres[0] = pts[rng.integers(m)]
    d2 = np.maximum(sq - 2 * pts @ centres[0] + float(centres[0] @ centres[0]), 0)
    for j in range(1, k):
        total = d2.sum()
        cand = rng.choice(m, size=trials, p=d2 / total) if total > 0 else rng.integers(m, size=trials)
        cand_d2 = np.maximum(sq[None] - 2 * (pts[cand] @ pts.T) + sq[cand][:, None], 0)  # (trials, m)
        new = np.minimum(d2[None], cand_d2)
        best = int(new.sum(1).argmin())
        centres[j], d2 = pts[cand[best]], new[best]
    return centres


def _kmeans(points: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None) -> np.ndarray:
    points = as_float32(points)
    n, d = points.shape
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed) % (2**31), verbose=False,
                      # every point counts (faiss subsamples to 256·k by default) and no warning
                      # for small resampled sets
                      max_points_per_centroid=1 << 30, min_points_per_centroid=1)
    km.train(points, init_centroids=None if init is None else as_float32(init))
    return as_float32(km.centroids)


def assign(x, centroids: np.ndarray, chunk_size: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int64) and squared L2 distance (float32) of every row of `x`, in chunks."""
    centroids = as_float32(centroids)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for s, e in chunks(n, chunk_size):
        D, I = index.search(as_float32(x[s:e]), 1)
        labels[s:e], dist[s:e] = I[:, 0], D[:, 0]
    return labels, dist


def nearest_per_cluster(labels: np.ndarray, dist: np.ndarray, s: int) -> np.ndarray:
    """Sorted indices of the `s` points nearest their centroid in every cluster (all of smaller ones)."""
    order = np.lexsort((dist, labels))
    lab = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < s])


def resampled_kmeans(x, k: int, n_resampling_steps: int = 0, sample_size: int = 10, niter: int = 20,
                     seed: int = 0, init: str = "random", max_train_points: int | None = None,
                     chunk_size: int = CHUNK, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level of the curation k-means: k-means, then `n_resampling_steps` resample-and-recluster steps.

    Returns (centroids (k, d), labels (N,), squared distances (N,)) after the final assignment.
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"cannot make {k} clusters from {n} points; lower the level's cluster count")
    rng = np.random.default_rng(seed)
    train = x
    if max_train_points is not None and n > max_train_points:
        train = x[np.sort(rng.choice(n, size=int(max_train_points), replace=False))]
    start = None
    if init == "kmeans++":
        start = kmeans_plusplus(train, k, seed=seed, sample=max(50 * k, 10000))
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'kmeans++', got '{init}'")
    centroids = _kmeans(train, k, niter, seed, start)
    if progress is not None:
        progress.update(1)
    for step in range(int(n_resampling_steps)):
        labels, dist = assign(x, centroids, chunk_size)
        idx = nearest_per_cluster(labels, dist, int(sample_size))
        if len(idx) < k:  # too few non-empty clusters to recluster; keep the current centroids
            log.info("resampling step %d: only %d points near %d centroids; stopping", step + 1, len(idx), k)
            break
        centroids = _kmeans(x[idx], k, niter, seed + step + 1, centroids)
        if progress is not None:
            progress.update(1)
    labels, dist = assign(x, centroids, chunk_size)
    return centroids, labels, dist


# ------------------------------------------------------------------------------------------------
# Hierarchical k-means tree
# ------------------------------------------------------------------------------------------------

@dataclass
class ClusterTree:
    """The hierarchical k-means result.

    - ``centroids[l]``: (k_l, d) centroids of level l (l = 0 is the finest level, clustering the points);
    - ``labels[0]``: (N,) level-0 cluster of every point; ``labels[l]`` for l >= 1: (k_{l-1},) level-l
      parent of every level-(l-1) cluster;
    - ``distances``: (N,) squared L2 distance of every point to its level-0 centroid.
    """

    centroids: list[np.ndarray]
    labels: list[np.ndarray]
    distances: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    @property
    def n_points(self) -> int:
        return len(self.labels[0])

    def point_labels(self, level: int) -> np.ndarray:
        """(N,) cluster of every point at `level`."""
        lab = self.labels[0]
        for l in range(1, level + 1):
            lab = self.labels[l][lab]
        return lab

    def sizes(self, level: int) -> np.ndarray:
        """Number of points under every cluster of `level`."""
        return np.bincount(self.point_labels(level), minlength=len(self.centroids[level]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = {f"centroids_{l}": c for l, c in enumerate(self.centroids)}
        arrays.update({f"labels_{l}": a for l, a in enumerate(self.labels)})
        np.savez(path, distances=self.distances, n_levels=np.array(self.n_levels),
                 meta=np.array(json.dumps(self.meta)), **arrays)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> "ClusterTree":
        with np.load(path) as z:
            L = int(z["n_levels"])
            return cls([z[f"centroids_{l}"] for l in range(L)], [z[f"labels_{l}"] for l in range(L)],
                       z["distances"], json.loads(str(z["meta"])))


def _per_level(value, n_levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n_levels:
            raise ValueError(f"{name} has {len(value)} entries but there are {n_levels} levels")
        return list(value)
    return [value] * n_levels


def hierarchical_kmeans(x, levels: Sequence[int], n_resampling_steps: int | Sequence[int] = 0,
                        sample_size: int | Sequence[int] = 10, seed: int = 0, progress: bool = False,
                        niter: int = 20, init: str = "random", max_train_points: int | None = None,
                        chunk_size: int = CHUNK) -> ClusterTree:
    """Resampled hierarchical k-means (see the module doc).

    Args:
        x: (N, d) points (array or memmap); embeddings are expected L2-normalised.
        levels: clusters per level, finest first, e.g. ``[1000, 100, 10]``.
        n_resampling_steps, sample_size: r (resample-and-recluster steps) and s (points kept
            nearest each centroid), one value or a list with one per level, finest first.
        init: 'random' (faiss) or 'kmeans++' (our seeding, passed through ``init_centroids``).
        max_train_points: train level 1 on at most this many random points (all are assigned).
    """
    levels = [int(k) for k in levels]
    if not levels:
        raise ValueError("levels must name at least one cluster count")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must shrink from the finest to the coarsest level, got {levels}")
    steps = [int(r) for r in _per_level(n_resampling_steps, len(levels), "n_resampling_steps")]
    sizes = [int(s) for s in _per_level(sample_size, len(levels), "sample_size")]
    bar = tqdm(total=sum(1 + r for r in steps), desc="hierarchical k-means", disable=not progress)
    centroids, labels = [], []
    distances = None
    points = x
    t0 = time.perf_counter()
    for l, k in enumerate(levels):
        c, lab, dist = resampled_kmeans(points, k, steps[l], sizes[l], niter=niter, seed=seed + 1000 * l,
                                        init=init, max_train_points=max_train_points if l == 0 else None,
                                        chunk_size=chunk_size, progress=bar)
        centroids.append(c)
        labels.append(lab)
        if l == 0:
            distances = dist
        points = c
    bar.close()
    meta = {"levels": levels, "n_resampling_steps": steps, "sample_size": sizes, "seed": seed, "niter": niter,
            "init": init, "seconds": round(time.perf_counter() - t0, 3)}
    return ClusterTree(centroids, labels, distances, meta)
