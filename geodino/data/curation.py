"""Data curation: band statistics, embeddings, clustering-based balanced sampling, retrieval, dedup.

Reimplemented from the paper (Vo et al. 2024, "Automatic Data Curation for Self-Supervised
Learning", arXiv 2405.15613) on top of faiss; no code of facebookresearch/ssl-data-curation
(CC-BY-NC) is used.

1. **Embed** the pool with a backbone: L2-normalised CLS embeddings, streamed to a disk-backed
   ``.npy`` (``np.lib.format.open_memmap``) so pools larger than memory work (`embed_source`).
2. **Hierarchical k-means with resampling** (`hierarchical_kmeans`): level 1 clusters the points,
   level l+1 clusters the centroids of level l. At each level, after a first k-means, r times:
   take the s points nearest each centroid, rerun k-means on that more even subset (warm-started
   from the current centroids) and reassign every point. This spreads the centroids over the
   support of the data instead of piling them into dense modes.
3. **Balanced hierarchical sampling** (`balanced_sample`): N items are split over the top-level
   clusters by water-filling (the largest cut c with sum_i min(c, size_i) <= N; clusters smaller
   than c give everything, the remainder goes one each, at random, to clusters larger than c), then
   recursively over each cluster's children; leaves give random points ('r') or the points nearest
   their centroid ('c').
4. **Retrieval** (`retrieve`): the union of each query's k nearest pool items (faiss IndexFlatIP or
   IVF on L2-normalised embeddings). **Deduplication** (`deduplicate`): `range_search` keeps the
   first item of every group of near-copies.

Memmaps: every function takes ``np.memmap`` / ``np.load(..., mmap_mode='r')`` arrays and reads them
in chunks where it matters (assignment, resampling, index building, search). faiss k-means itself
trains on an in-memory float32 copy of the points it is given: ``max_train_points`` bounds that
copy for level 1 on huge pools (every point is still assigned).

Item lists written by ``geodino curate`` (the formats `data=` configs accept):

- folder sources: a **file list**, one image path per line (absolute), ``#`` comments allowed;
  pass it as ``data.file_list=<path>``.
- raster sources: a **chip list**, a text file with ``# key: value`` header lines (``format``,
  ``seed``, ``chip_size``, ``bands``, ``files``) then one chip index per line. Chip ``i`` is the chip
  `RasterSource(seed=seed, chip_size=chip_size)` draws for index ``i`` on the same files; pass it as
  ``data.chip_list=<path>`` (the source then uses the list's seed for chip identity).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from geodino.data.lists import read_chip_list
from geodino.errors import DataError, GeodinoError

log = logging.getLogger("geodino")

STATS_FORMAT = "geodino band stats v1"
_CHUNK = 65536


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    x = _f32(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(s + size, n)


def faiss_module():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise GeodinoError("data curation needs faiss (pip install faiss-cpu)") from e
    return faiss


def _per_level(value, n_levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n_levels:
            raise ValueError(f"{name} has {len(value)} entries but there are {n_levels} levels")
        return list(value)
    return [value] * n_levels


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
        pts = _f32(x[np.sort(rng.choice(n, size=sample, replace=False))])
    else:
        pts = _f32(x[:])
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
    faiss = faiss_module()
    points = _f32(points)
    n, d = points.shape
    km = faiss.Kmeans(d, int(k), niter=int(niter), seed=int(seed) % (2**31), verbose=False,
                      # every point counts (faiss subsamples to 256·k by default) and no warning
                      # for small resampled sets
                      max_points_per_centroid=1 << 30, min_points_per_centroid=1)
    km.train(points, init_centroids=None if init is None else _f32(init))
    return _f32(km.centroids)


def assign(x, centroids: np.ndarray, chunk_size: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int64) and squared L2 distance (float32) of every row of `x`, in chunks."""
    faiss = faiss_module()
    centroids = _f32(centroids)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    for s, e in _chunks(n, chunk_size):
        D, I = index.search(_f32(x[s:e]), 1)
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
                     chunk_size: int = _CHUNK, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def hierarchical_kmeans(x, levels: Sequence[int], n_resampling_steps: int | Sequence[int] = 0,
                        sample_size: int | Sequence[int] = 10, seed: int = 0, progress: bool = False,
                        niter: int = 20, init: str = "random", max_train_points: int | None = None,
                        chunk_size: int = _CHUNK) -> ClusterTree:
    """Resampled hierarchical k-means (see the module doc).

    Args:
        x: (N, d) points (array or memmap); embeddings are expected L2-normalised.
        levels: clusters per level, finest first, e.g. ``[1000, 100, 10]``.
        n_resampling_steps, sample_size: r (resample-and-recluster steps) and s (points kept
            nearest each centroid), one value or a list with one per level, finest first.
        init: 'random' (faiss) or 'kmeans++' (our seeding, passed through ``init_centroids``).
        max_train_points: train level 1 on at most this many random points (all are assigned).
    """
    from tqdm.auto import tqdm

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


# ------------------------------------------------------------------------------------------------
# Balanced hierarchical sampling
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Retrieval and deduplication
# ------------------------------------------------------------------------------------------------

def _build_ip_index(pool, index: str, nlist: int | None, nprobe: int, normalize: bool, seed: int,
                    chunk_size: int):
    faiss = faiss_module()
    n, d = pool.shape
    prep = l2_normalize if normalize else _f32
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = int(nlist) if nlist else max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        m = min(n, 64 * nlist)  # enough for a coarse quantizer
        train = pool[np.sort(rng.choice(n, size=m, replace=False))] if m < n else pool[:]
        idx.cp.max_points_per_centroid = 1 << 30
        idx.cp.min_points_per_centroid = 1
        idx.train(prep(train))
        idx.nprobe = int(min(nprobe, nlist))
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got '{index}'")
    for s, e in _chunks(n, chunk_size):
        idx.add(prep(pool[s:e]))
    return idx


def retrieve(pool, queries, k: int = 10, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
             normalize: bool = True, chunk_size: int = _CHUNK, return_neighbours: bool = False, seed: int = 0,
             progress: bool = False):
    """Union of every query's `k` nearest pool items by cosine similarity (inner product on
    L2-normalised rows), with an exact (`flat`) or IVF (`ivf`, `nlist` lists, `nprobe` probed) index.

    Returns the sorted union of pool indices, and with ``return_neighbours=True`` also the (Q, k)
    neighbour indices (-1 where IVF found fewer) and similarities, best first. On CPU the exact index
    is the faster one for pools up to about a million items (100k x 384, 10k queries: ~7 s flat
    against ~12 s IVF train+add+search on 2 cores); IVF pays off beyond that.
    """
    from tqdm.auto import tqdm

    n = pool.shape[0]
    if queries.shape[1] != pool.shape[1]:
        raise DataError(f"queries have dimension {queries.shape[1]} but the pool has {pool.shape[1]}")
    k = int(min(k, n))
    idx = _build_ip_index(pool, index, nlist, nprobe, normalize, seed, chunk_size)
    prep = l2_normalize if normalize else _f32
    q = queries.shape[0]
    I = np.empty((q, k), dtype=np.int64)
    D = np.empty((q, k), dtype=np.float32)
    for s, e in tqdm(list(_chunks(q, chunk_size)), desc="retrieval", disable=not progress):
        D[s:e], I[s:e] = idx.search(prep(queries[s:e]), k)
    union = np.unique(I[I >= 0])
    return (union, I, D) if return_neighbours else union


def deduplicate(x, threshold: float = 0.95, reference=None, normalize: bool = True, chunk_size: int = 8192,
                progress: bool = False) -> np.ndarray:
    """Sorted indices of the rows of `x` to keep.

    Rows whose cosine similarity is at least `threshold` are near-copies; walking the rows in order,
    each kept row removes its later near-copies, so the first row of every group survives. With
    `reference` (e.g. an evaluation set), rows that are near-copies of any reference row are removed
    as well.
    """
    from tqdm.auto import tqdm

    faiss = faiss_module()
    n, d = x.shape
    prep = l2_normalize if normalize else _f32
    removed = np.zeros(n, dtype=bool)
    if reference is not None and len(reference):
        ref = faiss.IndexFlatIP(d)
        for s, e in _chunks(reference.shape[0], _CHUNK):
            ref.add(prep(reference[s:e]))
        for s, e in _chunks(n, chunk_size):
            lims, _, _ = ref.range_search(prep(x[s:e]), float(threshold))
            removed[s:e] |= np.diff(lims.astype(np.int64)) > 0
    index = faiss.IndexFlatIP(d)
    for s, e in _chunks(n, _CHUNK):
        index.add(prep(x[s:e]))
    src_list, dst_list = [], []
    for s, e in tqdm(list(_chunks(n, chunk_size)), desc="deduplication", disable=not progress):
        lims, _, I = index.range_search(prep(x[s:e]), float(threshold))
        src = np.repeat(np.arange(s, e), np.diff(lims.astype(np.int64)))
        later = I > src
        src_list.append(src[later])
        dst_list.append(I[later])
    src = np.concatenate(src_list) if src_list else np.empty(0, np.int64)
    dst = np.concatenate(dst_list) if dst_list else np.empty(0, np.int64)
    if len(src):
        order = np.argsort(src, kind="stable")
        src, dst = src[order], dst[order]
        heads = np.r_[0, np.flatnonzero(np.diff(src)) + 1, len(src)]
        for a, b in zip(heads[:-1], heads[1:]):
            if not removed[src[a]]:
                removed[dst[a:b]] = True
    return np.flatnonzero(~removed)


# ------------------------------------------------------------------------------------------------
# Embedding
# ------------------------------------------------------------------------------------------------

class _EmbedView:
    """source[indices[j]] resized to a square `size` (short side, centre crop) when needed."""

    def __init__(self, source, indices, size: int | None, patch: int):
        self.source, self.indices, self.size, self.patch = source, indices, size, patch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j: int):
        import torch
        import torch.nn.functional as F

        img = self.source[int(self.indices[j])]
        if not torch.is_tensor(img):
            img = img["image"] if isinstance(img, dict) else torch.as_tensor(img)
        img = img.float()
        h, w = img.shape[-2:]
        size = self.size
        if size is None:
            if h == w and h % self.patch == 0:
                return img
            size = max(self.patch, (min(h, w) // self.patch) * self.patch)
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            if (nh, nw) != (h, w):
                img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True,
                                    align_corners=False)[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            img = img[:, top:top + size, left:left + size]
        return img


def _stack_same_size(xs):
    import torch

    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes {sorted(shapes)[:3]}...: set image_size= to resize them to one size")
    return torch.stack(xs)


def _cls_embedding(backbone, x):
    out = backbone.forward_features(x) if hasattr(backbone, "forward_features") else backbone(x)
    if isinstance(out, dict):
        out = out["x_norm_clstoken"]
    return out


def embed_source(backbone, source, batch_size: int = 64, out_path: str | Path | None = None, progress: bool = False,
                 *, indices: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, image_size: int | None = None, num_workers: int = 0,
                 device="cpu") -> np.ndarray:
    """L2-normalised CLS embeddings of `source[i]` for i in `indices` (default: all), in order.

    With `out_path` the rows stream to a float32 ``.npy`` memmap (written as ``<out>.partial`` and
    renamed when complete) and the returned array is that file opened read-only with
    ``mmap_mode='r'``; otherwise an in-memory array. Images are normalised with `mean`/`std` and, if
    `image_size` is set (or sizes vary), resized (short side) and centre-cropped to a square.
    """
    import torch
    from tqdm.auto import tqdm

    indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise DataError("nothing to embed: the source is empty")
    patch = int(backbone.token_stride)
    view = _EmbedView(source, indices, image_size, patch)
    loader = torch.utils.data.DataLoader(view, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                                         collate_fn=_stack_same_size)
    mean_t = None if mean is None else torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = None if std is None else torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    backbone = backbone.to(device).eval()
    out = None
    tmp = None
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".partial")
    pos = 0
    with torch.inference_mode():
        for x in tqdm(loader, desc="embedding", total=len(loader), disable=not progress):
            if mean_t is not None:
                x = (x - mean_t) / std_t
            e = torch.nn.functional.normalize(_cls_embedding(backbone, x.to(device)).float(), dim=-1).cpu().numpy()
            if out is None:
                shape = (n, e.shape[1])
                out = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                       if tmp is not None else np.empty(shape, dtype=np.float32))
            out[pos:pos + len(e)] = e
            pos += len(e)
    if tmp is None:
        return out
    out.flush()
    del out
    os.replace(tmp, out_path)
    return np.load(out_path, mmap_mode="r")


# ------------------------------------------------------------------------------------------------
# Item lists
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Embedding outputs
# ------------------------------------------------------------------------------------------------

def load_embeddings(path: str | Path) -> tuple[np.ndarray, dict, list[str] | None, np.ndarray | None]:
    """(embeddings memmap, embed.json dict, file list or None, chip indices or None) of an embed output
    folder, or of a bare ``.npy`` file (then no items)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        npy = path / "embeddings.npy"
        if not npy.is_file():
            raise DataError(f"{path} holds no embeddings.npy; run `geodino curate action=embed out={path}` first")
        meta = json.loads((path / "embed.json").read_text()) if (path / "embed.json").is_file() else {}
        files = chips = None
        items = path / "items.txt"
        if items.is_file():
            if meta.get("kind") == "raster":
                chips, header = read_chip_list(items)
                meta = {**header, **meta}
            else:
                files = [l.strip() for l in items.read_text().splitlines() if l.strip() and not l.startswith("#")]
        return np.load(npy, mmap_mode="r"), meta, files, chips
    if path.suffix == ".npy" and path.is_file():
        return np.load(path, mmap_mode="r"), {}, None, None
    raise DataError(f"embeddings '{path}' is neither an embed output folder nor a .npy file")
