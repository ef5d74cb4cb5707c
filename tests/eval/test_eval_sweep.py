"""Learning-rate sweeps: the grid is config, the best on validation is picked, that model is reported."""

from __future__ import annotations

import math

import pytest
from fakes.eval_fakes import eval_argv, make_geobench_task, make_loveda, read_results

from geodino import cli
from geodino.errors import GeodinoError
from geodino.eval.probes import sweep_lr

@pytest.fixture
def coarse_loveda(tmp_path):
    """One class per 16-px token: a linear head on the tiny random ViT can learn it."""
    return make_loveda(tmp_path / "LoveDA16", n_per_scene=2, size=64, block=16)


LOVEDA = ("task.window=64", "task.stride=64", "task.epochs=30", "task.batch_size=4", "n_figures=0")


def test_sweep_lr_keeps_the_best_model_in_both_directions_and_never_a_nan():
    fits = []

    def fit(lr):
        fits.append(lr)
        return {"lr": lr}

    planted = {1e-4: 0.2, 1e-3: 0.9, 1e-2: float("nan"), 1e-1: 0.5}
    best, model, curve = sweep_lr(list(planted), fit, lambda m: planted[m["lr"]])
    assert best == 1e-3 and model == {"lr": 1e-3} and fits == list(planted)
    assert curve["0.001"] == 0.9 and math.isnan(curve["0.01"])
    loss = {1e-4: 3.0, 1e-3: 1.0, 1e-2: 2.0}
    assert sweep_lr(list(loss), fit, lambda m: loss[m["lr"]], higher_is_better=False)[0] == 1e-3
    assert sweep_lr([1.0, 2.0], fit, lambda m: float("nan"))[0] == 1.0  # all NaN: the first, not a crash
    with pytest.raises(GeodinoError, match="empty"):
        sweep_lr([], fit, lambda m: 0.0)


@pytest.mark.parametrize("grid", ["[1e-7,3e-2]", "[3e-2,1e-7]"])
def test_loveda_sweep_picks_the_planted_best_lr_and_reports_that_model(coarse_loveda, tmp_path, grid):
    """1e-7 cannot move the head in 30 steps, 3e-2 learns the colour -> class map: the sweep must pick 3e-2 on
    val and the reported number must be exactly the 3e-2 model's (the same as a run with only that lr)."""
    assert cli.main(eval_argv("loveda", coarse_loveda, tmp_path, *LOVEDA, f"task.lrs={grid}", "task.val_split=val")) == 0
    r = read_results(tmp_path / "run")
    sweep = r["heads"]["linear"]["lr_sweep"]
    assert sweep["best_lr"] == pytest.approx(3e-2) and sweep["selected_on"] == "val"
    assert sweep["val"]["0.03"] > sweep["val"]["1e-07"] + 20
    argv = eval_argv("loveda", coarse_loveda, tmp_path, *LOVEDA, "task.lr=3e-2")
    argv[3] = f"run_dir={tmp_path / 'single'}"
    assert cli.main(argv) == 0
    assert r["miou"] == pytest.approx(read_results(tmp_path / "single")["miou"])
    assert r["protocol"]["lr_selected_on"] == "val"


def test_loveda_sweep_without_val_split_holds_out_training_tiles(coarse_loveda, tmp_path):
    assert cli.main(eval_argv("loveda", coarse_loveda, tmp_path, *LOVEDA, "task.lrs=[1e-7,3e-2]",
                              "task.val_fraction=0.25")) == 0
    r = read_results(tmp_path / "run")
    sweep = r["heads"]["linear"]["lr_sweep"]
    assert sweep["selected_on"] == "train[0.25 held out, seed 0]" and sweep["best_lr"] == pytest.approx(3e-2)
    assert r["n_train_windows"] == 3  # 4 training tiles, one held out
    assert set(r["feature_cache"]) >= {"loveda/train[rest: 0.25 held out, seed 0]", "loveda/train[0.25 held out, seed 0]"}


def test_canopy_sweep_minimises_mae_on_val(canopy_root, tmp_path):
    assert cli.main(eval_argv("canopy", canopy_root, tmp_path, "task.patch=32", "task.epochs=30", "task.batch_size=4",
                              "task.lrs=[1e-7,1e-2]", "n_figures=0")) == 0
    sweep = read_results(tmp_path / "run")["heads"]["linear"]["lr_sweep"]
    assert sweep["best_lr"] == pytest.approx(1e-2) and sweep["selected_on"] == "val" and not sweep["higher_is_better"]
    assert sweep["val"]["0.01"] < sweep["val"]["1e-07"]


def test_geobench_segmentation_sweep_picks_on_valid_and_refits_on_train_and_valid(tmp_path):
    root = tmp_path / "gb"
    make_geobench_task(root, "m-fake-seg", "seg", n_classes=3, size=32, n=(4, 2, 2), seed=2)
    assert cli.main(eval_argv("geobench", root, tmp_path, "task.epochs=30", "task.batch_size=4",
                              "task.lrs=[1e-7,3e-2]", "n_figures=0")) == 0
    seg = read_results(tmp_path / "run")["tasks"]["m-fake-seg"]
    sweep = seg["heads"]["linear"]["lr_sweep"]
    assert sweep["selected_on"] == "valid" and sweep["refit_on"] == "train+valid"
    assert sweep["best_lr"] == pytest.approx(3e-2) and set(sweep["val"]) == {"1e-07", "0.03"}


def test_a_sweep_without_anywhere_to_score_it_is_refused(canopy_root, tmp_path, capsys):
    assert cli.main(eval_argv("canopy", canopy_root, tmp_path, "task.patch=32", "task.lrs=[1e-3,1e-2]",
                              "task.val_split=nosuch")) == 2
    assert "nosuch" in capsys.readouterr().err
