"""Pretraining that says when it does not learn: the learning monitor, the small-compute recipe and the probes
(issue "Pretraining that measurably learns at the scale a user can run")."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from geodino import cli
from geodino.train.monitors import LearningMonitor

TINY = ["stage.crops.global_crops_size=32", "stage.crops.local_crops_size=16", "stage.crops.local_crops_number=2",
        "data.chip_size=48", "train.pca_png=false", "progress=false", "train.monitor_every=0",
        "stage.dino.head_hidden_dim=64", "stage.dino.head_bottleneck_dim=32", "stage.ibot.head_hidden_dim=64",
        "stage.ibot.head_bottleneck_dim=32"]


def _rows(gaps, prototypes=8.0, loss=None, k=64):
    return [{"dino_target_gap": g, "dino_target_prototypes": prototypes, "dino_logit_spread": 0.1,
             "loss_dino_global": math.log(k) - (loss if loss is not None else g)} for g in gaps]


def test_the_monitor_fires_once_on_uniform_targets_and_says_what_to_change(caplog):
    mon = LearningMonitor(64, warmup_steps=5, patience=10)
    with caplog.at_level(logging.WARNING, logger="geodino"):
        for step, row in enumerate(_rows([0.001] * 40)):
            mon(step, row)
    warnings = [r.getMessage() for r in caplog.records if "not learning" in r.getMessage()]
    assert len(warnings) == 1 and "recipe=small" in warnings[0] and "step 14" in warnings[0]  # 5 warm-up + 10
    assert mon.summary()["learned"] is False and mon.summary()["verdict"] == "not learning"


def test_the_monitor_stays_silent_when_targets_carry_information(caplog):
    mon = LearningMonitor(64, warmup_steps=5, patience=10)
    with caplog.at_level(logging.WARNING, logger="geodino"):
        for step, row in enumerate(_rows([0.001] * 8 + [0.3] * 40, loss=0.4)):
            mon(step, row)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    s = mon.summary()
    assert s["learned"] is True and s["dino_loss_below_ln_k"] == pytest.approx(0.4) and s["verdict"] == "learning"


def test_collapse_is_a_verdict_of_its_own(caplog):
    mon = LearningMonitor(64, patience=5)
    with caplog.at_level(logging.WARNING, logger="geodino"):
        for step, row in enumerate(_rows([1.5] * 10, prototypes=1.0, loss=1.0)):
            mon(step, row)
    assert mon.summary()["verdict"] == "collapsed"
    assert any("collapse" in r.getMessage() for r in caplog.records)


def test_a_short_run_is_undecided():
    mon = LearningMonitor(64, patience=100)
    for step, row in enumerate(_rows([0.001] * 20)):
        mon(step, row)
    assert mon.summary()["verdict"].startswith("undecided")


def test_the_reference_recipe_at_tiny_scale_is_flagged_in_the_log_and_the_summary(tmp_path, capsys):
    run = tmp_path / "ref"
    assert cli.main(["train", f"run_dir={run}", *TINY, "train.batch_size=4", "train.iterations=16",
                     "train.checkpoint_every=16", "train.learning_patience=6",
                     "ema.warmup_teacher_temp_iterations=2"]) == 0
    learning = json.loads((run / "summary.json").read_text())["learning"]
    assert learning["learned"] is False and learning["verdict"] == "not learning"
    assert learning["target_entropy_gap"] < 0.005 and learning["ln_k"] == pytest.approx(math.log(4096))
    assert capsys.readouterr().err.count("not learning") == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[-1] for k in ("dino_target_gap", "dino_logit_spread", "dino_target_prototypes"))


def test_recipe_small_is_an_override_set_on_the_reference():
    ref = cli.compose("train", [])
    small = cli.compose("train", ["recipe=small"])
    assert (ref.stage.dino.head_n_prototypes, small.stage.dino.head_n_prototypes) == (4096, 64)
    assert small.model.kwargs.layerscale_init == 1.0 and small.ema.teacher_temp == 0.01
    assert small.ema.momentum == small.ema.final_momentum == 0.99 and small.train.batch_size == 32
    # the command line still wins over the recipe
    assert cli.compose("train", ["recipe=small", "train.batch_size=16"]).train.batch_size == 16
    diff = {k for k in ("stage", "ema", "optim", "train", "model") if ref[k] != small[k]}
    assert diff == {"stage", "ema", "optim", "train", "model"} and ref.data == small.data


@pytest.mark.slow
def test_recipe_small_leaves_the_uniform_phase_quickly(tmp_path, capsys):
    """The small recipe at reduced size (batch 16, 80 steps): the DINO targets carry information well before the
    monitor's patience, so it stays silent, and the DINO loss falls below ln K."""
    run = tmp_path / "small"
    assert cli.main(["train", "recipe=small", f"run_dir={run}", *TINY, "train.batch_size=16",
                     "train.iterations=80", "train.checkpoint_every=80", "train.learning_patience=30"]) == 0
    learning = json.loads((run / "summary.json").read_text())["learning"]
    assert "not learning" not in capsys.readouterr().err
    assert learning["target_entropy_gap"] > 0.05, learning
    assert learning["learned"] is True, learning


def test_the_dense_probe_can_fail():
    """The probe separates informative features from uninformative ones: raw patch means score far above a
    constant feature, which is at the majority-class level."""
    from geodino.data.sample import SENTINEL2_BANDS
    from geodino.eval.sample_probe import dense_sets, linear_probe_miou, raw_features
    from geodino.models import build_backbone

    (xtr, ytr), (xte, yte) = dense_sets(stride=32)
    contract = build_backbone("geodino_vit_tiny", in_chans=13).geodino_contract.with_data(bands=SENTINEL2_BANDS)
    good = linear_probe_miou(raw_features(xtr, contract), ytr, raw_features(xte, contract), yte)
    const = linear_probe_miou(torch.ones(len(xtr), 16, 4), ytr, torch.ones(len(xte), 16, 4), yte)
    assert good["miou"] > 70 and const["miou"] < 35 and good["miou"] - const["miou"] > 40


def test_the_sample_probes_run_on_any_sentinel2_folder(tmp_path):
    """`read_rasters` maps a 4-band B02/B03/B04/B08 GeoTIFF into the 13-band order by name (absent bands 0) and
    labels its patches from NDVI / NDWI: a water top and a forest bottom give class 0 above and class 1 below; a file
    without the label bands is refused by name."""
    import numpy as np

    from fakes.rasters import write_tif
    from geodino.data.sample import SENTINEL2_BANDS
    from geodino.errors import DataError
    from geodino.eval.sample_probe import dense_sets, read_rasters

    h = w = 128
    water = np.array([900, 1200, 500, 300])     # B02 B03 B04 B08: NDWI = (1200-300)/1500 > 0.1
    forest = np.array([300, 500, 300, 4000])    # NDVI = 3700/4300 > 0.5
    data = np.zeros((4, h, w), np.uint16)
    data[:, : h // 2] = water[:, None, None]
    data[:, h // 2:] = forest[:, None, None]
    path = write_tif(tmp_path / "s2" / "a.tif", data, 32633, 500000, 5000000, 10,
                     descriptions=["B02", "B03", "B04", "B08"])
    (img,) = read_rasters([path])
    assert img.shape == (len(SENTINEL2_BANDS), h, w)
    assert torch.allclose(img[SENTINEL2_BANDS.index("B08"), 0, 0], torch.tensor(0.03))
    assert float(img[SENTINEL2_BANDS.index("B11")].abs().max()) == 0.0
    (xtr, ytr), (xte, yte) = dense_sets(chip=32, stride=32, images=[img])
    assert xtr.shape == (8, 13, 32, 32) and ytr.shape == (8, 2, 2)
    assert bool((ytr == 0).all()) and bool((yte == 1).all())
    bad = write_tif(tmp_path / "bad.tif", data[:2], 32633, 500000, 5000000, 10, descriptions=["B02", "B03"])
    with pytest.raises(DataError, match=r"bad\.tif.*missing B04, B08"):
        read_rasters([bad])
