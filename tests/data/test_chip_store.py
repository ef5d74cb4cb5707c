"""The chip store: `geodino curate action=chip` cuts the chips a raster source draws into memory-mappable shards;
`data=chips` trains from them with the same index-addressed sampling (exact resume, chip lists still apply)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from geodino import cli
from geodino.data.lists import write_chip_list
from geodino.data.sources import build_source
from geodino.data.sources.chips import ChipStore
from geodino.errors import DataError
from geodino.train import loop

TINY = ["train.batch_size=4", "stage.crops.global_crops_size=32", "stage.crops.local_crops_size=16",
        "stage.crops.local_crops_number=2", "stage.dino.head_n_prototypes=32", "stage.dino.head_hidden_dim=32",
        "stage.dino.head_bottleneck_dim=16", "stage.ibot.head_n_prototypes=32", "stage.ibot.head_hidden_dim=32",
        "stage.ibot.head_bottleneck_dim=16", "train.pca_png=false", "progress=false", "train.monitor_every=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("chips") / "store"
    assert cli.main(["curate", "action=chip", "data.chip_size=48", "n_chips=24", "shard_size=10", f"out={out}",
                     "progress=false", "stats_chips=8"]) == 0
    return out


def test_the_store_holds_the_sources_chips_in_their_dtype(store):
    raster = build_source(cli.compose("curate", ["data.chip_size=48"]).data, stats=False).source
    chips = ChipStore(store)
    assert chips.n_chips == 24 and len(chips.shards) == 3 and chips.shards[0].dtype == np.uint16
    assert chips.band_names == raster.band_names and chips.chip_size == 48
    for i in (0, 9, 10, 23):  # across shard borders
        assert torch.equal(chips[i], raster[i]), i
        assert np.array_equal(chips.raw(i), raster.chip(i).numpy().astype(np.uint16))
    meta = json.loads((store / "store.json").read_text())
    assert len(meta["stats"]["mean"]) == 13 and meta["rows"] == [0.0, 0.5] and meta["crs"] == "EPSG:32618"
    where = chips.footprint(5)
    x0, y0, x1, y1 = where["bounds"]
    assert x1 - x0 == pytest.approx(48 * 10) and y1 - y0 == pytest.approx(48 * 10)
    assert where["file"].endswith(".tif") and where["valid_fraction"] == 1.0 and where["chip"] == 5


def test_data_chips_is_a_source_with_the_stored_statistics_and_chip_lists(store, tmp_path):
    cfg = OmegaConf.create({"name": "chips", "kind": "chips", "paths": [str(store)], "chip_list": None,
                            "samples_per_epoch": None, "mean": None, "std": None, "stats_file": None})
    info = build_source(cfg)
    meta = json.loads((store / "store.json").read_text())
    assert info.mean == meta["stats"]["mean"] and info.n_bands == 13 and info.rgb_indices == (3, 2, 1)
    assert info.contract(__import__("geodino").build_backbone("geodino_vit_tiny", in_chans=13).geodino_contract).scale \
        == 10000.0
    lst = write_chip_list(tmp_path / "c.txt", [7, 3], {"seed": 0, "chip_size": 48})
    picked = build_source(OmegaConf.merge(cfg, {"chip_list": str(lst)})).source
    assert torch.equal(picked[0], info.source[7]) and torch.equal(picked[1], info.source[3])
    assert torch.equal(picked[2], info.source[7])
    with pytest.raises(DataError, match="not a chip store"):
        ChipStore(tmp_path)
    assert cli.main(["curate", "action=chip", "n_chips=2", f"out={store}", "progress=false"]) == 2  # never overwritten


def test_training_from_a_store_resumes_exactly(store, tmp_path, monkeypatch):
    from geodino.train.run import run_train

    def cfg(run):
        return cli.compose("train", ["data=chips", f"data.paths=[{store}]", f"run_dir={run}", *TINY,
                                     "train.iterations=4", "train.checkpoint_every=2", "train.keep_last=5"])

    run_train(cfg(tmp_path / "full"))
    real_fit = loop.Trainer.fit

    def killed_fit(self, on_step=None):
        def kill(step, row):
            if step == 2:
                raise KeyboardInterrupt
        return real_fit(self, on_step=kill)

    monkeypatch.setattr(loop.Trainer, "fit", killed_fit)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(loop.Trainer, "fit", real_fit)
    run_train(cfg(tmp_path / "resumed"))
    rows = {}
    for name in ("full", "resumed"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = {r["step"]: r["loss"] for r in map(json.loads, lines)}
    assert rows["full"] == pytest.approx(rows["resumed"], rel=1e-6) and sorted(rows["full"]) == [0, 1, 2, 3]


def test_chips_with_nodata_fill_it_and_whole_chips_read_fast_and_the_same(tmp_path):
    from fakes.rasters import write_tif

    from geodino.data.sources.chips import write_chip_store
    from geodino.data.sources.raster import RasterSource

    rng = np.random.default_rng(0)
    data = rng.integers(200, 4000, size=(4, 96, 96)).astype(np.uint16)
    data[:, :30, :40] = 0  # a nodata corner
    write_tif(tmp_path / "r" / "a.tif", data, 32631, 500_000, 5_000_000, 10, nodata=0)
    source = RasterSource([tmp_path / "r"], chip_size=32, length=40, seed=3, nodata_max_fraction=0.9)
    source.fill_nodata([0.1, 0.2, 0.3, 0.4])
    write_chip_store(source, tmp_path / "store", 40)
    store = ChipStore(tmp_path / "store")
    store.fill_nodata([0.1, 0.2, 0.3, 0.4])
    fractions = store.index["valid_fraction"]
    assert (fractions < 1).any() and (fractions == 1).any()  # both paths are exercised
    for i in range(40):
        x, valid = store.item_with_mask(i)
        rx, rvalid = source.item_with_mask(i)
        assert torch.equal(x, rx) and torch.equal(valid, rvalid), i
        if fractions[i] < 1:
            assert torch.equal(x[:, ~valid], torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None].expand(4, int((~valid).sum())))
