"""The packaged caption sample (issue 19): real Sentinel-2 chips with captions from the stated land-cover rule,
rebuilt identically by scripts/make_sample_captions.py, small, trainable with `data=sample_captions`, and its
held-out labelled half scored by `geodino eval ov` (default root)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import rasterio

from geodino import cli
from geodino.data.sample import SENTINEL2_BANDS, sample_captions_path, sample_dir, sample_ov_dir

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_sample_captions.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_sample_captions", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_caption_sample_is_small_real_and_follows_the_stated_rule(tmp_path):
    files = [p for d in ("captions", "ov") for p in (sample_dir() / d).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    rows = [json.loads(line) for line in sample_captions_path().read_text().splitlines()]
    assert len(rows) == 50 and all(len(r["caption"]) == 3 for r in rows)
    with rasterio.open(sample_captions_path().parent / rows[0]["path"]) as src:
        assert src.descriptions == SENTINEL2_BANDS and src.shape == (32, 32) and src.crs.to_epsg() == 32618

    # the rebuild gives the same captions and labels
    _script().build(tmp_path)
    assert (tmp_path / "captions" / "captions.jsonl").read_text() == sample_captions_path().read_text()
    for name in ("south_0.tif", "south_1.tif"):
        for sub in ("images", "labels"):
            with rasterio.open(tmp_path / "ov" / sub / name) as a, rasterio.open(sample_ov_dir() / sub / name) as b:
                assert np.array_equal(a.read(), b.read()) and a.transform == b.transform

    # a caption names what the rule finds: an all-water chip is "water", a mixed one lists both, larger first
    mod = _script()
    assert mod.captions_for(np.zeros((4, 4), np.int64))[0] == "water"
    lab = np.array([[1] * 6 + [3] * 4] * 10)
    assert mod.captions_for(lab) == ["dense vegetation and bare or built-up land",
                                     "a satellite image of dense vegetation and bare or built-up land",
                                     "mostly dense vegetation"]


def test_train_on_sample_captions_then_eval_ov_on_the_held_out_half(tmp_path):
    """`geodino train stage=text data=sample_captions` (tiny sizes, 3 steps) then `geodino eval ov` without root."""
    from geodino.text.io import load_dinotxt

    run = tmp_path / "run"
    rc = cli.main(["train", "stage=text", "data=sample_captions", f"run_dir={run}", "progress=false", "threads=1",
                   "train.iterations=3", "train.batch_size=4", "stage.crops.size=32", "stage.text.width=32",
                   "stage.text.layers=1", "stage.text.heads=2", "stage.embed_dim=64", "stage.vision_head_blocks=1"])
    assert rc == 0
    _, meta = load_dinotxt(run)
    assert meta["contract"].bands == list(SENTINEL2_BANDS) and meta["data"]["n_pairs"] == 50
    rc = cli.main(["eval", "ov", f"backbone={run}", f"run_dir={tmp_path / 'ov'}", "progress=false", "threads=1"])
    assert rc == 0
    res = json.loads((tmp_path / "ov" / "results.json").read_text())["results"]
    assert res["protocol"]["classes"] == ["water", "dense vegetation", "sparse vegetation", "bare or built-up land"]
    assert sum(res["protocol"]["labelled_pixels_per_class"].values()) == 2 * 128 * 128
    assert res["floors"]["majority_class"]["class"] == "water"
    assert 0.0 <= res["miou"] <= 100.0
