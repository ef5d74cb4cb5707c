"""`geodino eval geobench` end to end on fake GEO-Bench v1 tasks (HDF5 + task metadata + partitions)."""

from __future__ import annotations

import pytest
from fakes.eval_fakes import eval_argv, read_results

from geodino import cli
from geodino.testing import cli_error_lines

FAST = ("task.epochs=3", "task.knn_k=5", "task.lrs=[0.001,0.01]", "task.batch_size=8")


@pytest.mark.parametrize("weights", ["random", "official"])
def test_geobench_end_to_end_from_the_cli(geobench_root, tmp_path, official_tiny_weights, weights):
    extra = ("backbone=geodino_vit_tiny", f"weights={official_tiny_weights}") if weights == "official" else ()
    assert cli.main(eval_argv("geobench", geobench_root, tmp_path, *FAST, *extra)) == 0
    r = read_results(tmp_path / "run")
    tasks = r["tasks"]
    assert set(tasks) == {"m-fake-cls", "m-fake-multilabel", "m-fake-seg"}
    cls = tasks["m-fake-cls"]
    assert cls["n"] == {"train": 6, "valid": 3, "test": 3}
    assert set(cls["probes"]) == {"knn", "linear"}
    assert 0 <= cls["probes"]["knn"]["test"]["accuracy"] <= 100
    assert cls["probes"]["linear"]["lr"] in (0.001, 0.01) and set(cls["probes"]["linear"]["valid_sweep"]) == {"0.001", "0.01"}
    assert cls["bands"] == ["04 - Red", "03 - Green", "02 - Blue"]
    ml = tasks["m-fake-multilabel"]
    assert ml["type"] == "multilabel classification" and "f1_micro" in ml["probes"]["linear"]["test"]
    seg = tasks["m-fake-seg"]
    assert seg["type"] == "segmentation" and seg["window"] == 32 and 0 <= seg["score"] <= 100
    assert set(seg["heads"]["linear"]["per_class_iou"]) == {"class0", "class1", "class2"}
    assert set(r["classification_mean"]) == {"knn", "linear"}
    assert r["segmentation_mean"] == pytest.approx(seg["score"])
    assert r["published"]["classification"]["numbers"]["DINOv3 Sat ViT-L/16"]["mean"] == 79.6
    assert (tmp_path / "run" / "figures" / "pca_features_m-fake-seg.png").is_file()


def test_one_task_and_all_bands(geobench_root, tmp_path):
    argv = eval_argv("geobench", geobench_root, tmp_path, *FAST, "task.benchmark_task=m-fake-cls", "task.bands=all",
                     "task.probes=[knn]", "cache_features=false")
    assert cli.main(argv) == 0
    r = read_results(tmp_path / "run")
    # without the cache, features live in memory-mapped files inside the run dir, removed at the end
    assert r["feature_cache"]["dir"] is None and r["feature_cache"]["m-fake-cls/train"] == "disabled"
    assert not (tmp_path / "run" / "_features_tmp").exists() and not (tmp_path / "cache").exists()
    assert list(r["tasks"]) == ["m-fake-cls"] and list(r["tasks"]["m-fake-cls"]["probes"]) == ["knn"]
    # the three fake bands in stored order; the RGB filters go to the red/green/blue positions
    assert r["tasks"]["m-fake-cls"]["bands"] == ["02 - Blue", "03 - Green", "04 - Red"]


def test_unknown_task_is_a_one_line_error(geobench_root, tmp_path, capsys):
    assert cli.main(eval_argv("geobench", geobench_root, tmp_path, "task.benchmark_task=m-eurosat")) == 2
    err = capsys.readouterr().err.strip()
    assert len(cli_error_lines(err)) == 1 and cli_error_lines(err)[0].startswith("error:")
    assert "m-eurosat not under" in err and "available: m-fake-cls, m-fake-multilabel, m-fake-seg" in err
