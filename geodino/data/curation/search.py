"""Similarity search over embedding pools on faiss: retrieval and deduplication.

- `retrieve`: the union of each query's k nearest pool items by cosine similarity (inner product on
  L2-normalised rows), with an exact (``IndexFlatIP``) or an IVF index (Vo et al. 2024, arXiv 2405.15613,
  retrieval-based curation).
- `deduplicate`: ``range_search`` above a cosine threshold keeps the first item of every group of
  near-copies, and optionally drops items near any row of a reference set (e.g. an evaluation set).

Pools may be memmaps: indexes are built and searched in chunks of rows.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
from tqdm.auto import tqdm

from geodino.data.curation.arrays import CHUNK, as_float32, chunks, l2_normalize
from geodino.errors import DataError


def _build_ip_index(pool, index: str, nlist: int | None, nprobe: int, normalize: bool, seed: int,
                    chunk_size: int):
    n, d = pool.shape
    prep = l2_normalize if normalize else as_float32
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
    for s, e in chunks(n, chunk_size):
        idx.add(prep(pool[s:e]))
    return idx


def retrieve(pool, queries, k: int = 10, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
             normalize: bool = True, chunk_size: int = CHUNK, return_neighbours: bool = False, seed: int = 0,
             progress: bool = False):
    """Union of every query's `k` nearest pool items by cosine similarity (inner product on
    L2-normalised rows), with an exact (`flat`) or IVF (`ivf`, `nlist` lists, `nprobe` probed) index.

    Returns the sorted union of pool indices, and with ``return_neighbours=True`` also the (Q, k)
    neighbour indices (-1 where IVF found fewer) and similarities, best first. On CPU the exact index
    is the faster one for pools up to about a million items (100k x 384, 10k queries: ~7 s flat
    against ~12 s IVF train+add+search on 2 cores); IVF pays off beyond that.
    """
    n = pool.shape[0]
    if queries.shape[1] != pool.shape[1]:
        raise DataError(f"queries have dimension {queries.shape[1]} but the pool has {pool.shape[1]}")
    k = int(min(k, n))
    idx = _build_ip_index(pool, index, nlist, nprobe, normalize, seed, chunk_size)
    prep = l2_normalize if normalize else as_float32
    q = queries.shape[0]
    I = np.empty((q, k), dtype=np.int64)
    D = np.empty((q, k), dtype=np.float32)
    for s, e in tqdm(list(chunks(q, chunk_size)), desc="retrieval", disable=not progress):
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
    n, d = x.shape
    prep = l2_normalize if normalize else as_float32
    removed = np.zeros(n, dtype=bool)
    if reference is not None and len(reference):
        ref = faiss.IndexFlatIP(d)
        for s, e in chunks(reference.shape[0], CHUNK):
            ref.add(prep(reference[s:e]))
        for s, e in chunks(n, chunk_size):
            lims, _, _ = ref.range_search(prep(x[s:e]), float(threshold))
            removed[s:e] |= np.diff(lims.astype(np.int64)) > 0
    index = faiss.IndexFlatIP(d)
    for s, e in chunks(n, CHUNK):
        index.add(prep(x[s:e]))
    src_list, dst_list = [], []
    for s, e in tqdm(list(chunks(n, chunk_size)), desc="deduplication", disable=not progress):
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
