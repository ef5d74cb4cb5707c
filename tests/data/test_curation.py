"""Curation (geodino.data.curation): resampled hierarchical k-means, balanced sampling (water-filling), retrieval,
dedup, streaming embeddings and the embed output format.

Item lists: tests/data/test_lists.py; the `geodino curate` verb: tests/cli/test_curate.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geodino.data import curation as cur
from geodino.models.extract import Extractor

BLOB_SIZES = [10, 20, 40, 80, 160, 320, 640, 1280]


def blobs(sizes=BLOB_SIZES, d=32, spread=0.005, seed=0):
    """Well-separated Gaussian blobs on the unit sphere: (points, blob id per point)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][: len(sizes)]  # orthonormal: far apart
    x = np.concatenate([c + spread * rng.normal(size=(n, d)) for c, n in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(y))
    return cur.l2_normalize(x[perm]), y[perm]


def water_fill_cut(sizes, n):
    """Reference: the largest c with sum(min(c, size)) <= n, by linear scan."""
    sizes = np.asarray(sizes)
    c = 0
    while np.minimum(sizes, c + 1).sum() <= n and c < sizes.max():
        c += 1
    return c


def assert_water_filled(sizes, counts, n):
    sizes, counts = np.asarray(sizes), np.asarray(counts)
    if n >= sizes.sum():
        np.testing.assert_array_equal(counts, sizes)
        return
    assert counts.sum() == n
    c = water_fill_cut(sizes, n)
    base = np.minimum(sizes, c)
    extra = counts - base
    assert set(np.unique(extra)) <= {0, 1}, (sizes, counts, c)
    assert np.all(extra[sizes <= c] == 0), "clusters at or below the cut give exactly their size"
    assert extra.sum() == n - base.sum() < (sizes > c).sum()


def test_water_fill_matches_the_rule_on_many_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=rng.integers(1, 12))
        n = int(rng.integers(0, sizes.sum() + 5))
        assert_water_filled(sizes, cur.water_fill(sizes, n, rng), n)


def test_one_level_clusters_recover_blobs_and_sampling_balances_them():
    x, y = blobs()
    tree = cur.hierarchical_kmeans(x, [len(BLOB_SIZES)], init="kmeans++", seed=0)
    lab = tree.labels[0]
    # every cluster is exactly one blob
    for c in range(len(BLOB_SIZES)):
        assert len(np.unique(y[lab == c])) == 1
    assert sorted(np.bincount(lab)) == sorted(BLOB_SIZES)

    # 403 = 10 + 20 + 40 + 5*66 + 3: the cut is 66, three of the five big blobs give one more
    n = 403
    picked = cur.balanced_sample(tree, n, strategy="r", seed=3)
    assert len(picked) == n == len(np.unique(picked))
    per_blob = np.bincount(y[picked], minlength=len(BLOB_SIZES))
    assert water_fill_cut(BLOB_SIZES, n) == 66
    np.testing.assert_array_equal(per_blob[:3], [10, 20, 40])
    assert sorted(per_blob[3:]) == [66, 66, 67, 67, 67]
    assert_water_filled(BLOB_SIZES, per_blob, n)
    # the raw pool's smallest blob holds 0.4 %; the balanced sample 2.5 %
    assert per_blob[0] / n > 5 * BLOB_SIZES[0] / sum(BLOB_SIZES)


def test_two_level_tree_is_water_filled_at_every_node():
    x, y = blobs(seed=1)
    tree = cur.hierarchical_kmeans(x, [40, 8], n_resampling_steps=[2, 2], sample_size=[5, 3], seed=0,
                                   init="kmeans++")
    assert [c.shape for c in tree.centroids] == [(40, 32), (8, 32)]
    assert tree.labels[0].shape == (sum(BLOB_SIZES),) and tree.labels[1].shape == (40,)
    n = 500
    picked = cur.balanced_sample(tree, n, strategy="r", seed=0)
    assert len(picked) == n == len(np.unique(picked))
    # top level
    top = tree.point_labels(1)
    assert_water_filled(tree.sizes(1), np.bincount(top[picked], minlength=8), n)
    # inside every top-level cluster, over its children
    leaf_counts = np.bincount(tree.labels[0][picked], minlength=40)
    top_counts = np.bincount(top[picked], minlength=8)
    for p in range(8):
        kids = np.flatnonzero(tree.labels[1] == p)
        assert_water_filled(tree.sizes(0)[kids], leaf_counts[kids], top_counts[p])
    # deterministic per seed
    np.testing.assert_array_equal(picked, cur.balanced_sample(tree, n, strategy="r", seed=0))
    assert not np.array_equal(picked, cur.balanced_sample(tree, n, strategy="r", seed=1))


def test_strategy_c_takes_the_points_nearest_each_centroid():
    x, _ = blobs(seed=2)
    tree = cur.hierarchical_kmeans(x, [8], init="kmeans++")
    picked = cur.balanced_sample(tree, 200, strategy="c")
    lab, dist = tree.labels[0], tree.distances
    for c in range(8):
        members = np.flatnonzero(lab == c)
        chosen = np.intersect1d(members, picked)
        if 0 < len(chosen) < len(members):
            assert dist[chosen].max() <= np.sort(dist[members])[len(chosen)]


def test_resampling_spreads_centroids_toward_sparse_blobs():
    x, y = blobs(seed=3, spread=0.2)
    plain = cur.hierarchical_kmeans(x, [16], seed=0)
    resampled = cur.hierarchical_kmeans(x, [16], n_resampling_steps=5, sample_size=2, seed=0)

    def centroids_on_small_blobs(tree):
        # blob of the points nearest each centroid
        owner = np.array([np.bincount(y[tree.labels[0] == c], minlength=8).argmax()
                          if (tree.labels[0] == c).any() else -1 for c in range(16)])
        return int(np.isin(owner, [0, 1, 2, 3]).sum())

    assert centroids_on_small_blobs(resampled) >= centroids_on_small_blobs(plain)


def test_memmap_input_matches_in_memory(tmp_path):
    x, _ = blobs(seed=4)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = cur.hierarchical_kmeans(x, [20, 5], n_resampling_steps=1, sample_size=4, seed=0)
    b = cur.hierarchical_kmeans(mm, [20, 5], n_resampling_steps=1, sample_size=4, seed=0, chunk_size=97)
    np.testing.assert_array_equal(a.labels[0], b.labels[0])
    np.testing.assert_array_equal(a.labels[1], b.labels[1])
    t = a.save(tmp_path / "tree.npz")
    c = cur.ClusterTree.load(t)
    np.testing.assert_array_equal(c.labels[0], a.labels[0])
    assert c.meta["levels"] == [20, 5]


def test_too_many_clusters_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot make 50 clusters from 10 points"):
        cur.hierarchical_kmeans(np.random.rand(10, 4).astype("f4"), [50])
    with pytest.raises(ValueError, match="shrink"):
        cur.hierarchical_kmeans(np.random.rand(10, 4).astype("f4"), [2, 5])


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_retrieve_returns_the_true_nearest_neighbours(index, tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(3000, 48)).astype("f4")
    queries = rng.normal(size=(40, 48)).astype("f4")
    np.save(tmp_path / "pool.npy", pool)
    pool_mm = np.load(tmp_path / "pool.npy", mmap_mode="r")
    k = 7
    kw = {"nlist": 16, "nprobe": 16} if index == "ivf" else {}  # probing every list: exact
    union, I, D = cur.retrieve(pool_mm, queries, k=k, index=index, chunk_size=500, return_neighbours=True, **kw)
    sims = cur.l2_normalize(queries) @ cur.l2_normalize(pool).T
    truth = np.argsort(-sims, axis=1)[:, :k]
    np.testing.assert_array_equal(I, truth)
    np.testing.assert_allclose(D, np.take_along_axis(sims, truth, 1), atol=1e-5)
    np.testing.assert_array_equal(union, np.unique(truth))


def test_deduplicate_removes_planted_near_copies():
    rng = np.random.default_rng(0)
    base = cur.l2_normalize(rng.normal(size=(500, 64)))
    src = rng.choice(500, size=30, replace=False)
    copies = cur.l2_normalize(base[src] + 0.01 * rng.normal(size=(30, 64)))
    x = np.concatenate([base, copies])
    keep = cur.deduplicate(x, threshold=0.95, chunk_size=128)
    np.testing.assert_array_equal(keep, np.arange(500))
    # a copy placed first is kept, its original (later) removed
    y = np.concatenate([copies[:1], base])
    keep = cur.deduplicate(y, threshold=0.95)
    assert 0 in keep and 1 + src[0] not in keep and len(keep) == 500
    # against a reference set: items near any reference row go
    keep = cur.deduplicate(base, threshold=0.95, reference=copies)
    assert set(src).isdisjoint(keep) and len(keep) == 470


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=10, c=3, size=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, c, size, size, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_embed_source_streams_normalised_cls_embeddings_to_a_memmap(tmp_path):
    from geodino.models import load_backbone

    torch.manual_seed(0)
    model = load_backbone("geodino_vit_tiny")
    with torch.no_grad():  # LayerScale starts at 1e-5, so a fresh model embeds every image alike
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    src = _Images()
    mean, std = [0.5] * 3, [0.25] * 3
    out = cur.embed_source(Extractor(model, torch.device('cpu')), src, batch_size=4, out_path=tmp_path / "emb.npy", mean=mean, std=std)
    assert isinstance(out, np.memmap) and out.shape == (10, 96) and out.dtype == np.float32
    assert not (tmp_path / "emb.npy.partial").exists()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        ref = model.forward_features((src.x - 0.5) / 0.25)["x_norm_clstoken"]
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert out.std(0).max() > 1e-2  # rows differ, so the order is checked too
    sub = cur.embed_source(Extractor(model, torch.device('cpu')), src, batch_size=3, indices=[7, 2], mean=mean, std=std)
    np.testing.assert_allclose(sub, ref[[7, 2]], atol=1e-5)


def test_embed_output_round_trip_with_file_and_chip_lists(tmp_path):
    x = cur.l2_normalize(np.random.default_rng(0).normal(size=(3, 8)))
    files = [tmp_path / f"img{i}.png" for i in range(3)]
    photos = tmp_path / "photos"
    photos.mkdir()
    np.save(photos / "embeddings.npy", x)
    cur.write_embed_meta(photos, {"kind": "folder", "data": "nat"}, files=files, file_header="a header")
    emb, meta, got_files, chips = cur.load_embeddings(photos)
    np.testing.assert_array_equal(emb, x)
    assert meta == {"kind": "folder", "data": "nat"} and chips is None
    assert got_files == [str(f.resolve()) for f in files]

    rasters = tmp_path / "rasters"
    rasters.mkdir()
    np.save(rasters / "embeddings.npy", x)
    cur.write_embed_meta(rasters, {"kind": "raster", "n": 3}, chips=[4, 0, 7], chip_header={"seed": 5, "chip_size": 32})
    emb, meta, got_files, chips = cur.load_embeddings(rasters)
    assert chips.tolist() == [4, 0, 7] and got_files is None
    assert meta["seed"] == 5 and meta["chip_size"] == 32 and meta["n"] == 3 and meta["kind"] == "raster"
    # a bare .npy: embeddings only
    emb, meta, got_files, chips = cur.load_embeddings(rasters / "embeddings.npy")
    assert emb.shape == (3, 8) and meta == {} and got_files is None and chips is None


def test_embed_output_errors_name_the_offending_path(tmp_path):
    with pytest.raises(Exception, match="holds no embeddings.npy"):
        cur.load_embeddings(tmp_path)
    with pytest.raises(Exception, match="neither an embed output folder nor a .npy file"):
        cur.load_embeddings(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="needs kind 'raster'"):
        cur.write_embed_meta(tmp_path, {"kind": "folder"}, chips=[1])
    with pytest.raises(ValueError, match="either chips"):
        cur.write_embed_meta(tmp_path, {"kind": "raster"})
