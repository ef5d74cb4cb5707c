"""Data curation: embeddings, clustering-based balanced sampling, retrieval, deduplication.

Reimplemented from the paper (Vo et al. 2024, "Automatic Data Curation for Self-Supervised
Learning", arXiv 2405.15613) on top of faiss; no code of facebookresearch/ssl-data-curation
(CC-BY-NC) is used. One concern per module:

1. **Embed** the pool with a backbone (`embed`): L2-normalised CLS embeddings, streamed to a
   disk-backed ``.npy`` (``np.lib.format.open_memmap``) so pools larger than memory work
   (`embed_source`); the embed output folder (``embeddings.npy``, ``items.txt``, ``embed.json``) is
   written with `write_embed_meta` and read back with `load_embeddings`.
2. **Hierarchical k-means with resampling** (`kmeans`, `hierarchical_kmeans`): level 1 clusters the
   points, level l+1 clusters the centroids of level l. At each level, after a first k-means, r times:
   take the s points nearest each centroid, rerun k-means on that more even subset (warm-started from
   the current centroids) and reassign every point. This spreads the centroids over the support of
   the data instead of piling them into dense modes.
3. **Balanced hierarchical sampling** (`sampling`, `balanced_sample`): N items are split over the
   top-level clusters by water-filling (the largest cut c with sum_i min(c, size_i) <= N; clusters
   smaller than c give everything, the remainder goes one each, at random, to clusters larger than c),
   then recursively over each cluster's children; leaves give random points ('r') or the points
   nearest their centroid ('c').
4. **Retrieval** (`search`, `retrieve`): the union of each query's k nearest pool items (faiss
   IndexFlatIP or IVF on L2-normalised embeddings). **Deduplication** (`deduplicate`): `range_search`
   keeps the first item of every group of near-copies.

`arrays` holds the shared helpers (float32 copies, `l2_normalize`, row chunks).

Memmaps: every function takes ``np.memmap`` / ``np.load(..., mmap_mode='r')`` arrays and reads them
in chunks where it matters (assignment, resampling, index building, search). faiss k-means itself
trains on an in-memory float32 copy of the points it is given: ``max_train_points`` bounds that
copy for level 1 on huge pools (every point is still assigned).

Elsewhere: the chip-list and file-list formats of the selections (what ``data.chip_list=`` /
``data.file_list=`` accept) live in geodino.data.lists, band statistics in geodino.data.stats, and the
command line (``geodino curate action=stats|embed|balance|retrieve|dedup``) in geodino.verbs.curate.
"""

from geodino.data.curation.arrays import l2_normalize
from geodino.data.curation.embed import embed_source, load_embeddings, write_embed_meta
from geodino.data.curation.kmeans import (
                                          ClusterTree,
                                          assign,
                                          hierarchical_kmeans,
                                          kmeans_plusplus,
                                          nearest_per_cluster,
                                          resampled_kmeans,
)
from geodino.data.curation.sampling import balanced_sample, water_fill
from geodino.data.curation.search import deduplicate, retrieve

__all__ = [
    "ClusterTree", "assign", "balanced_sample", "deduplicate", "embed_source", "hierarchical_kmeans",
    "kmeans_plusplus", "l2_normalize", "load_embeddings", "nearest_per_cluster", "resampled_kmeans", "retrieve",
    "water_fill", "write_embed_meta",
]
