"""`geodino eval canopy` end to end on fake GeoTIFF pairs, and the pair checks."""

from __future__ import annotations

import numpy as np
import pytest
from fakes.eval_fakes import eval_argv, read_results

from geodino import cli
from geodino.testing import cli_error_lines

FAST = ("task.patch=32", "task.stride=16", "task.block_size=16", "task.epochs=15", "task.lr=0.01")


@pytest.mark.parametrize("weights", ["random", "official"])
def test_canopy_end_to_end_from_the_cli(canopy_root, tmp_path, official_tiny_weights, weights):
    extra = ("backbone=geodino_vit_tiny", f"weights={official_tiny_weights}") if weights == "official" else ()
    assert cli.main(eval_argv("canopy", canopy_root, tmp_path, *FAST, *extra)) == 0
    r = read_results(tmp_path / "run")
    for k in ("mae", "rmse", "bias", "r2", "block_r2"):
        assert r[k] is not None and np.isfinite(r[k]), k
    lin = r["heads"]["linear"]
    assert lin["valid_pixels"] == 64 * 64 - 36  # the 6x6 nodata patch is not scored
    assert r["protocol"]["block_size_px"] == 16 and r["protocol"]["block_size_m"] == 16.0
    # heights are a simple function of colour here: even a random frozen ViT + linear head beats the mean
    assert r["mae"] < 0.8 * r["target_std_m"]
    assert (tmp_path / "run" / "figures" / "pca_features.png").is_file()
    assert any(p.name.startswith("linear_00_tile_03") for p in (tmp_path / "run" / "figures").iterdir())


def _rewrite_chm(path, **changes):
    import rasterio

    with rasterio.open(path) as src:
        data, prof = src.read(), src.profile
    prof.update(changes)
    if "height" in changes:
        data = data[:, : changes["height"], : changes["width"]]
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)


@pytest.mark.parametrize("change,message", [
    ({"height": 48, "width": 48}, "is 64x64 but .*chm/tile_03.tif is 48x48"),
    ({"crs": "EPSG:4326"}, "has CRS EPSG:32631 but .*chm/tile_03.tif has CRS EPSG:4326"),
])
def test_mismatched_pair_is_a_one_line_error_naming_both_files(canopy_root, tmp_path, capsys, change, message):
    import re

    _rewrite_chm(canopy_root / "chm" / "tile_03.tif", **change)
    assert cli.main(eval_argv("canopy", canopy_root, tmp_path, *FAST)) == 2
    err = capsys.readouterr().err.strip()
    assert len(cli_error_lines(err)) == 1 and cli_error_lines(err)[0].startswith("error:") and "Traceback" not in err
    assert "images/tile_03.tif" in err and re.search(message, err), err


def test_missing_files_are_clear(canopy_root, tmp_path, capsys):
    (canopy_root / "chm" / "tile_01.tif").unlink()
    assert cli.main(eval_argv("canopy", canopy_root, tmp_path, *FAST)) == 2
    assert "chm/tile_01.tif: missing (sample 'tile_01' listed in" in capsys.readouterr().err
    (canopy_root / "splits" / "test.txt").unlink()
    assert cli.main(eval_argv("canopy", canopy_root, tmp_path, *FAST)) == 2
    assert "splits/test.txt not found" in capsys.readouterr().err
