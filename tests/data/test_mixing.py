"""Weighted source mixing by index with homogeneous batches, on top of IndexedBatches."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from geodino.data.mixing import MixedDataset, MixPlan, mix_sources
from geodino.errors import DataError
from geodino.train.loop import IndexedBatches

NAMES = ["lvd", "sat", "imagenet"]


class Tagged(torch.utils.data.Dataset):
    """item i of source k -> tensor [k, i] (so a batch tells where each sample came from)."""

    def __init__(self, k: int, bands=("R", "G", "B")):
        self.k, self.band_names = k, list(bands)

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([self.k, int(i)])


def make(batch_size=8, world_size=1, frac=0.1, seed=0, weights=(0.6, 0.4, 0.0)):
    return MixedDataset({n: Tagged(k) for k, n in enumerate(NAMES)}, dict(zip(NAMES, weights)), batch_size,
                        homogeneous_fraction=frac, homogeneous_source="imagenet", seed=seed, world_size=world_size)


def stack(samples, rng: random.Random):
    return torch.stack(samples)


def test_items_are_deterministic_and_read_item_i_of_their_source():
    a, b = make(), make()
    for i in [0, 7, 8, 1234, 10**9]:
        x = a[i]
        torch.testing.assert_close(x, b[i])
        assert int(x[1]) == i and NAMES[int(x[0])] == a.source_of(i)
    assert a.band_names == ["R", "G", "B"] and a.n_bands == 3


def test_homogeneous_share_and_mix_weights():
    plan = MixPlan(NAMES, {"lvd": 0.6, "sat": 0.4}, batch_size=16, homogeneous_fraction=0.1,
                   homogeneous_source="imagenet", seed=3)
    homog = [plan.is_homogeneous(b) for b in range(3000)]
    assert 0.08 < np.mean(homog) < 0.12
    counts = np.zeros(3)
    for b in range(3000):
        srcs = plan.slot_sources(b)
        if homog[b]:
            assert np.all(srcs == 2), "a homogeneous batch comes from the homogeneous source alone"
        else:
            counts += np.bincount(srcs, minlength=3)
    assert counts[2] == 0  # weight 0: only in homogeneous batches
    assert abs(counts[0] / counts.sum() - 0.6) < 0.02
    assert plan.batch_sources(next(b for b in range(3000) if homog[b])) == ["imagenet"] * 16


def test_with_indexed_batches_across_ranks_and_resume():
    B, W = 4, 2
    ranks = []
    for r in range(W):
        ds = make(batch_size=B, world_size=W)
        ib = IndexedBatches(ds, batch_size=B, collate=stack, seed=0, world_size=W, rank=r)
        ranks.append([(b, x) for b, x in itertools.islice(ib.iterate(0), 40)])
    plan = make(batch_size=B, world_size=W).plan
    seen_homog = False
    for (b0, x0), (b1, x1) in zip(*ranks):
        assert b0 == b1
        for r, x in ((0, x0), (1, x1)):
            # sample indices are exactly IndexedBatches' global indices
            start = (b0 * W + r) * B
            assert x[:, 1].tolist() == list(range(start, start + B))
            assert [NAMES[k] for k in x[:, 0].tolist()] == plan.batch_sources(b0, r)
        if plan.is_homogeneous(b0):
            seen_homog = True
            assert set(x0[:, 0].tolist()) == set(x1[:, 0].tolist()) == {2}  # every rank of the step agrees
        else:
            assert 2 not in x0[:, 0].tolist() + x1[:, 0].tolist()
    assert seen_homog
    # a resumed run sees exactly the batches an uninterrupted one would
    ib = IndexedBatches(make(batch_size=B, world_size=W), batch_size=B, collate=stack, seed=0, world_size=W, rank=1)
    for (b, x), (b_ref, x_ref) in zip(itertools.islice(ib.iterate(17), 5), ranks[1][17:22]):
        assert b == b_ref
        torch.testing.assert_close(x, x_ref)


def test_dataloader_workers_give_the_same_stream():
    ds = make(batch_size=4)
    ref = [x for _, x in itertools.islice(IndexedBatches(ds, 4, stack, seed=0).iterate(0), 6)]
    par = [x for _, x in itertools.islice(IndexedBatches(make(batch_size=4), 4, stack, seed=0, num_workers=2).iterate(0), 6)]
    for a, b in zip(ref, par):
        torch.testing.assert_close(a, b)


def test_seed_changes_the_plan_and_bad_configs_are_clear():
    a, b = make(seed=0).plan, make(seed=1).plan
    assert any(a.batch_sources(k) != b.batch_sources(k) for k in range(20))
    with pytest.raises(DataError, match="homogeneous_source 'inet' is not one of the sources"):
        MixPlan(NAMES, [1, 1, 1], 4, homogeneous_fraction=0.1, homogeneous_source="inet")
    with pytest.raises(DataError, match="non-negative"):
        MixPlan(NAMES, [1, -1, 1], 4)
    with pytest.raises(DataError, match="unknown source lvdd"):
        MixPlan(NAMES, {"lvdd": 1.0}, 4)
    with pytest.raises(DataError, match="one band layout"):
        MixedDataset({"rgb": Tagged(0), "s2": Tagged(1, bands=[f"B{i:02d}" for i in range(13)])}, [1, 1], 4)


def test_mix_sources_from_build_source_results():
    from omegaconf import OmegaConf

    from geodino.data.sources import build_source

    nat = OmegaConf.create(dict(name="sample_nat", kind="folder", paths=None, file_list=None, stats_file=None,
                                mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], min_size=32,
                                samples_per_epoch=16))
    a, b = build_source(nat), build_source(nat)
    mix = mix_sources({"photos": a, "more": b}, [0.5, 0.5], batch_size=2, homogeneous_fraction=0.5,
                      homogeneous_source="photos")
    x = mix[3]
    assert x.shape[0] == 3 and x.dtype == torch.float32
    b = b.with_stats([0.5, 0.5, 0.5], b.std)
    with pytest.raises(DataError, match="one normalisation"):
        mix_sources({"photos": a, "more": b}, [0.5, 0.5], batch_size=2)


def test_data_mix_config_builds_a_plan_of_named_sources_with_one_normalisation():
    """`data=mix`: sources named by base config plus overrides, weights by name, homogeneous batches from the
    named source, one normalisation for every source; the batch layout comes from the trainer."""
    from geodino import cli
    from geodino.data.sources import build_source

    cfg = cli.compose("train", ["data=mix", "data.homogeneous_fraction=0.5", "data.mean=[0.1]", "data.std=[0.2]",
                                "+data.sources.wide.bands=[B04]", "+data.sources.close.bands=[B04]"])
    with pytest.raises(DataError, match="batch_size"):
        build_source(cfg.data, seed=3)
    info = build_source(cfg.data, seed=3, batch_size=4, world_size=2)
    mixed = info.source
    assert info.band_names == ["B04"] and info.mean == [0.1] and info.std == [0.2]
    assert mixed.sources["wide"].chip_size == 128 and mixed.sources["close"].chip_size == 64
    homogeneous = [b for b in range(200) if mixed.plan.is_homogeneous(b)]
    assert 60 < len(homogeneous) < 140  # ~ half of the batches
    for b in homogeneous[:5]:
        for rank in (0, 1):
            assert mixed.plan.batch_sources(b, rank) == ["wide"] * 4
            i = (b * 2 + rank) * 4  # first sample of that rank's slice (IndexedBatches numbering)
            assert mixed[i].shape == (1, 128, 128)
    other = [b for b in range(200) if not mixed.plan.is_homogeneous(b)]
    seen = {s for b in other for s in mixed.plan.batch_sources(b, 0)}
    assert seen == {"wide", "close"}


def test_data_mix_refuses_sources_with_different_bands():
    from geodino import cli
    from geodino.data.sources import build_source

    cfg = cli.compose("train", ["data=mix", "+data.sources.wide.bands=[B04]", "+data.sources.close.bands=[B03]",
                                "data.mean=[0.1]", "data.std=[0.2]"])
    with pytest.raises(DataError, match="close has bands B03 but wide has B04"):
        build_source(cfg.data, batch_size=2)
