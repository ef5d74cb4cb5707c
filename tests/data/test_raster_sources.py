"""RasterSource on tiny GeoTIFFs written here: two CRSs, nodata regions, 4 and 13 bands with band
descriptions, and the named sensors (Sentinel-2, Landsat 8/9, NAIP) in their real file naming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes.rasters import const_bands, write_tif
from omegaconf import OmegaConf

from geodino.data.sources import build_source
from geodino.data.sources.raster import RasterSource
from geodino.data.stats import band_statistics
from geodino.errors import DataError

S2_13 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


@pytest.fixture(scope="module")
def two_crs(tmp_path_factory) -> Path:
    """Tile A (EPSG:32631) and tile B (EPSG:32632), 4 bands, 64x64 px at 10 m; the left quarter of A is nodata."""
    root = tmp_path_factory.mktemp("two_crs")
    names = ["B02", "B03", "B04", "B08"]
    a = const_bands([1000, 2000, 3000, 4000])
    a[:, :, :16] = 0
    write_tif(root / "tile_a.tif", a, 32631, 699000, 5_000_640, 10, descriptions=names)
    write_tif(root / "z_more" / "tile_b.tif", const_bands([4000, 5000, 6000, 7000]), 32632, 300000, 5_000_640, 10,
              descriptions=names)
    return root


def medians(chip: torch.Tensor) -> list[float]:
    return [round(float(b.median()), 3) for b in chip]


def test_chips_are_deterministic_scaled_and_come_from_both_crs(two_crs):
    src = RasterSource([two_crs], chip_size=16, length=100, seed=0, nodata_max_fraction=1.0)
    assert src.band_names == ["B02", "B03", "B04", "B08"] and src.n_bands == 4
    assert src.crs.to_epsg() == 32631 and len(src.files) == 2
    x = src[3]
    assert x.shape == (4, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, src[3])
    torch.testing.assert_close(x, RasterSource([two_crs], chip_size=16, seed=0, nodata_max_fraction=1.0)[3])
    seen = {tuple(medians(src[i])) for i in range(30)}
    # divided by scale=10000: tile A's bands read 0.1..0.4, tile B's (reprojected) 0.4..0.7
    assert (0.4, 0.5, 0.6, 0.7) in seen
    assert {(0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 0.0, 0.0)} & seen
    assert all(float(src[i].max()) <= 1.0 and float(src[i].min()) >= 0.0 for i in range(5))


def test_band_selection_by_name_keeps_the_requested_order(two_crs):
    src = RasterSource([two_crs / "z_more"], chip_size=16, bands=["B08", "B03"], seed=1)
    assert src.band_names == ["B08", "B03"]
    assert medians(src[0]) == [0.7, 0.5]


def test_missing_band_error_names_the_band_and_the_file(two_crs):
    with pytest.raises(DataError) as e:
        RasterSource([two_crs], chip_size=16, bands=["B04", "B11"])
    msg = str(e.value)
    assert "B11" in msg and "tile_a.tif" in msg and "B02, B03, B04, B08" in msg


def test_nodata_chips_are_skipped_and_counted(tmp_path):
    data = const_bands([500, 600, 700, 800])
    data[:, :, :48] = 0  # three quarters nodata
    write_tif(tmp_path / "mostly_empty.tif", data, 32631, 500000, 4_000_640, 10, descriptions=["B02", "B03", "B04", "B08"])
    src = RasterSource([tmp_path], chip_size=16, nodata_max_fraction=0.2, seed=0, max_redraws=200)
    for i in range(10):
        raw = src.chip(i)
        assert (~src.valid_mask(raw)).float().mean() <= 0.2
    assert src.skipped_nodata > 0
    # nothing but nodata: a clear error instead of zero chips
    write_tif(tmp_path / "empty" / "e.tif", np.zeros((4, 64, 64), np.uint16), 32631, 0, 640, 10,
              descriptions=["B02", "B03", "B04", "B08"])
    empty = RasterSource([tmp_path / "empty"], chip_size=16, max_redraws=5)
    with pytest.raises(DataError, match="nodata"):
        empty[0]
    assert empty.skipped_nodata == 5


def test_scaling_divides_and_clips(tmp_path):
    data = np.zeros((2, 32, 32), np.uint16)
    data[0], data[1] = 5000, 12000
    write_tif(tmp_path / "bright.tif", data, 32631, 0, 320, 10, descriptions=["B04", "B11"])
    x = RasterSource([tmp_path], chip_size=16)[0]
    assert torch.all(x[0] == 0.5) and torch.all(x[1] == 1.0)
    y = RasterSource([tmp_path], chip_size=16, scale=20000.0)[0]
    assert torch.all(y[0] == 0.25) and torch.all(y[1] == 0.6)


def test_thirteen_bands_by_description_and_band_layout_mismatch(tmp_path, two_crs):
    values = [100 * (i + 1) for i in range(13)]
    write_tif(tmp_path / "s2" / "stack.tif", const_bands(values, 48), 32618, 446610, 4_178_500, 10, descriptions=S2_13)
    src = RasterSource([tmp_path / "s2"], chip_size=32)
    assert src.band_names == S2_13 and src[0].shape == (13, 32, 32)
    sel = RasterSource([tmp_path / "s2"], chip_size=32, bands=["B8A", "B12", "B01"])
    assert medians(sel[0]) == [0.09, 0.13, 0.01]
    with pytest.raises(DataError, match="one band layout"):
        RasterSource([tmp_path / "s2", two_crs], chip_size=16)


def test_band_statistics_leave_nodata_out(two_crs):
    src = RasterSource([two_crs / "tile_a.tif"], chip_size=32, nodata_max_fraction=1.0, seed=0)
    info = {}
    mean, std = band_statistics(src, n=12, info=info)
    np.testing.assert_allclose(mean, [0.1, 0.2, 0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(std, 0, atol=1e-5)
    assert info["items"] == 12 and info["nodata_pixels_excluded"] > 0
    assert info["pixels"] + info["nodata_pixels_excluded"] == 12 * 32 * 32
    with_zeros, _ = band_statistics([src[i] for i in range(12)], n=12)  # items without their nodata masks
    assert with_zeros[0] < 0.1


def _raster_cfg(**kw):
    base = dict(name="test", kind="raster", paths=None, filename_glob="*.tif", bands=None, sensor=None, chip_size=16,
                scale=None, offset=None, mean=None, std=None, stats_file=None, nodata_max_fraction=0.5,
                samples_per_epoch=64, chip_list=None)
    base.update(kw)
    return OmegaConf.create(base)


def test_build_source_normalisation_from_stats_file_by_band_name(two_crs, tmp_path):
    stats = {"bands": ["B08", "B04", "B03", "B02"], "mean": [0.4, 0.3, 0.2, 0.1], "std": [4.0, 3.0, 2.0, 1.0],
             "scale": 10000.0}
    (tmp_path / "band_stats.json").write_text(json.dumps(stats))
    info = build_source(_raster_cfg(paths=[str(two_crs)], bands=["B02", "B08"],
                                    stats_file=str(tmp_path / "band_stats.json")))
    assert info.band_names == ["B02", "B08"] and info.mean == [0.1, 0.4] and info.std == [1.0, 4.0]
    # explicit mean/std win over the stats file
    info = build_source(_raster_cfg(paths=[str(two_crs)], mean=[0, 0, 0, 0], std=[1, 1, 1, 1],
                                    stats_file=str(tmp_path / "band_stats.json")))
    assert info.mean == [0.0] * 4
    (tmp_path / "partial.json").write_text(json.dumps({**stats, "bands": ["B02", "B03", "B04", "B05"]}))
    with pytest.raises(DataError, match="B08 not in data.stats_file .*partial.json"):
        build_source(_raster_cfg(paths=[str(two_crs)], stats_file=str(tmp_path / "partial.json")))
    with pytest.raises(DataError, match="scale=10000 but data.scale=255"):
        build_source(_raster_cfg(paths=[str(two_crs)], scale=255.0, stats_file=str(tmp_path / "band_stats.json")))


# ------------------------------------------------------------------------------------------------
# Named sensors, in each product's real file naming (as in torchgeo's own test data)
# ------------------------------------------------------------------------------------------------

S2_SCENE = "T31UFQ_20200101T103421"


def write_s2(root: Path, scene=S2_SCENE, bands=("B02", "B03", "B04", "B05", "B08"), offset=0) -> None:
    """One file per band, 10 m bands at 64 px and 20 m bands at 32 px over the same 640 m square."""
    for b in bands:
        res = 20 if b in ("B05", "B06", "B07", "B8A", "B11", "B12") else 10
        value = 100 * (S2_13.index(b) + 1) + offset
        write_tif(root / f"{scene}_{b}.tif", np.full((640 // res, 640 // res), value, np.uint16), 32631, 600000,
                  5_000_640, res)


def test_sentinel2_separate_band_files(tmp_path):
    write_s2(tmp_path / "s2")
    (tmp_path / "s2" / "notes.txt").write_text("not a raster")
    src = RasterSource([tmp_path / "s2"], chip_size=16, sensor="sentinel2", seed=0)
    assert src.sensor == "sentinel2" and type(src.dataset).__name__ == "Sentinel2"
    assert src.band_names == ["B02", "B03", "B04", "B05", "B08"]  # the bands on disk, in sensor order
    assert src.res == (10, 10)
    assert medians(src[0]) == [0.02, 0.03, 0.04, 0.05, 0.08]  # B05 resampled from 20 m
    sel = RasterSource([tmp_path / "s2"], chip_size=16, sensor="sentinel2", bands=["B08", "B04"])
    assert medians(sel[5]) == [0.08, 0.04]
    with pytest.raises(DataError) as e:
        RasterSource([tmp_path / "s2"], chip_size=16, sensor="sentinel2", bands=["B04", "B11"])
    assert "B11" in str(e.value) and f"{S2_SCENE}_B11.tif" in str(e.value)


def test_sentinel2_scene_missing_a_band_is_named(tmp_path):
    write_s2(tmp_path / "s2")
    write_s2(tmp_path / "s2", scene="T31UFQ_20200111T103421", bands=("B02", "B03", "B04", "B08"), offset=5)
    # by default only the bands every scene has
    src = RasterSource([tmp_path / "s2"], chip_size=16, sensor="sentinel2")
    assert src.band_names == ["B02", "B03", "B04", "B08"] and len(src.files) == 2
    with pytest.raises(DataError) as e:
        RasterSource([tmp_path / "s2"], chip_size=16, sensor="sentinel2", bands=["B04", "B05"])
    assert "B05" in str(e.value) and "T31UFQ_20200111T103421_B05.tif" in str(e.value)


@pytest.mark.parametrize("sensor,prefix", [("landsat8", "LC08"), ("landsat9", "LC09")])
def test_landsat_collection2_files(tmp_path, sensor, prefix):
    stem = "L2SP_199026_20200101_20200110_02_T1"
    for i in range(1, 8):
        write_tif(tmp_path / f"{prefix}_{stem}_SR_B{i}.TIF", np.full((64, 64), 7000 + 1000 * i, np.uint16), 32631,
                  600000, 5_001_920, 30)
    write_tif(tmp_path / f"{prefix}_{stem}_QA_PIXEL.TIF", np.ones((64, 64), np.uint16), 32631, 600000, 5_001_920, 30)
    other = "LC09" if prefix == "LC08" else "LC08"  # the other satellite's files are not picked up
    write_tif(tmp_path / f"{other}_{stem}_SR_B1.TIF", np.full((64, 64), 1, np.uint16), 32631, 600000, 5_001_920, 30)
    src = RasterSource([tmp_path], chip_size=16, sensor=sensor)  # Level-2 SR: 2.75e-5 DN - 0.2
    assert src.band_names == [f"SR_B{i}" for i in range(1, 8)] and src.res == (30, 30)
    assert len(src.files) == 1 and src.files[0].name.startswith(prefix)
    np.testing.assert_allclose(medians(src[0]), [2.75e-5 * (7000 + 1000 * i) - 0.2 for i in range(1, 8)], atol=1e-3)
    info = build_source(_raster_cfg(paths=[str(tmp_path)], sensor=sensor, bands=["SR_B4", "SR_B3", "SR_B2"],
                                    scale=None, mean=[0.0] * 3, std=[1.0] * 3))
    assert info.rgb_indices == (0, 1, 2) and info.band_names == ["SR_B4", "SR_B3", "SR_B2"]


def test_naip_four_band_files(tmp_path):
    data = const_bands([10, 20, 30, 40], dtype=np.uint8)
    write_tif(tmp_path / "m_3807511_ne_18_060_20181104.tif", data, 26918, 400000, 4_200_038.4, 0.6, nodata=None)
    write_tif(tmp_path / "unrelated.tif", data, 26918, 0, 38.4, 0.6, nodata=None)
    src = RasterSource([tmp_path], chip_size=16, sensor="naip", scale=255.0)
    assert src.band_names == ["R", "G", "B", "NIR"] and len(src.files) == 1
    assert type(src.dataset).__name__ == "NAIP"
    assert medians(src[0]) == [round(v / 255, 3) for v in (10, 20, 30, 40)]
    sel = RasterSource([tmp_path], chip_size=16, sensor="naip", scale=255.0, bands=["NIR", "R"])
    assert medians(sel[0]) == [round(40 / 255, 3), round(10 / 255, 3)]
    with pytest.raises(DataError, match="SWIR"):
        RasterSource([tmp_path], chip_size=16, sensor="naip", bands=["SWIR"])


def test_sensor_with_generic_stacked_files_falls_back_to_band_descriptions(two_crs):
    src = RasterSource([two_crs], chip_size=16, sensor="sentinel2")
    assert src.sensor is None and src.band_names == ["B02", "B03", "B04", "B08"]
    from geodino.data.sample import sample_sat_path

    info = build_source(_raster_cfg(paths=[str(sample_sat_path())], sensor="sentinel2", mean=[0.0] * 13,
                                    std=[1.0] * 13))
    assert info.n_bands == 13 and info.rgb_indices == (3, 2, 1)
