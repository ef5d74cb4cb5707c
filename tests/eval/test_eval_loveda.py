"""`geodino eval loveda` end to end on a fake LoveDA tree (torchgeo's loader), and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
from fakes.eval_fakes import eval_argv, read_results

from geodino import cli
from geodino.testing import cli_error_lines

FAST = ("task.window=32", "task.stride=16", "task.epochs=2", "task.batch_size=4")


@pytest.mark.parametrize("weights", ["random", "official"])
def test_loveda_end_to_end_from_the_cli(loveda_root, tmp_path, official_tiny_weights, weights):
    extra = ("backbone=geodino_vit_tiny", f"weights={official_tiny_weights}") if weights == "official" else ()
    assert cli.main(eval_argv("loveda", loveda_root, tmp_path, *FAST, *extra)) == 0
    run = tmp_path / "run"
    r = read_results(run)
    lin = r["heads"]["linear"]
    assert 0.0 <= r["miou"] <= 100.0 and r["miou"] == lin["miou"]
    assert set(lin["per_class_iou"]) == {"background", "building", "road", "water", "barren", "forest", "agriculture"}
    assert set(lin["per_group"]) == {"urban", "rural"}
    assert r["n_eval_tiles"] == 4 and r["n_eval_windows"] == 4
    assert lin["labelled_pixels"] == 4 * (32 * 32 - 4)  # the 2x2 no-data corner of each tile is ignored
    assert r["backbone"]["weights"] == (str(official_tiny_weights) if weights == "official" else None)
    assert r["published"]["loveda"]["numbers"]["DINOv3 Sat ViT-7B"] == 55.3
    md = (run / "report.md").read_text()
    assert "| miou |" in md and "DINOv3 Web ViT-7B" in md
    figs = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert "pca_features.png" in figs and len([f for f in figs if f.startswith("linear_")]) == 2
    assert (run / "config.yaml").is_file()


def test_loveda_heads_share_cached_features(loveda_root, tmp_path):
    assert cli.main(eval_argv("loveda", loveda_root, tmp_path, *FAST, "n_figures=0")) == 0
    first = read_results(tmp_path / "run")
    assert set(first["feature_cache"]) >= {"dir", "loveda/train", "loveda/val"}
    assert first["feature_cache"]["loveda/train"] == "written"
    argv = eval_argv("loveda", loveda_root, tmp_path, *FAST, "n_figures=0", "task.head=[light_decoder,linear]")
    argv[3] = f"run_dir={tmp_path / 'run2'}"
    assert cli.main(argv) == 0
    second = read_results(tmp_path / "run2")
    assert second["feature_cache"]["loveda/train"] == "hit" and second["feature_cache"]["loveda/val"] == "hit"
    assert set(second["heads"]) == {"light_decoder", "linear"}
    # same features, same seed -> the linear head reproduces the first run exactly
    assert second["heads"]["linear"]["miou"] == pytest.approx(first["heads"]["linear"]["miou"])


def test_mask_with_label_9_is_a_one_line_error_naming_the_file(loveda_root, tmp_path, capsys):
    from PIL import Image

    bad = loveda_root / "Val" / "Rural" / "masks_png" / "100.png"
    m = np.array(Image.open(bad))
    m[5, 5] = 9
    Image.fromarray(m, "L").save(bad)
    assert cli.main(eval_argv("loveda", loveda_root, tmp_path, *FAST)) == 2
    err = capsys.readouterr().err.strip()
    assert len(cli_error_lines(err)) == 1 and cli_error_lines(err)[0].startswith("error:") and "Traceback" not in err
    assert str(bad) in err and "label value(s) 9 outside LoveDA's 0..7" in err


def test_missing_split_and_mismatched_mask_are_clear(loveda_root, tmp_path, capsys):
    from PIL import Image

    bad = loveda_root / "Train" / "Urban" / "masks_png" / "0.png"
    Image.fromarray(np.ones((16, 16), np.uint8), "L").save(bad)
    assert cli.main(eval_argv("loveda", loveda_root, tmp_path, *FAST)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "mask is (16, 16) but its image is (32, 32)" in err

    assert cli.main(eval_argv("loveda", tmp_path / "nowhere", tmp_path, *FAST)) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(eval_argv("loveda", empty, tmp_path, *FAST)) == 2
    assert "Train/Urban/images_png" in capsys.readouterr().err


def test_corrupt_png_is_a_clear_error(loveda_root, tmp_path, capsys):
    bad = loveda_root / "Val" / "Urban" / "images_png" / "1.png"
    bad.write_bytes(b"not a png")
    assert cli.main(eval_argv("loveda", loveda_root, tmp_path, *FAST)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a readable image" in err
