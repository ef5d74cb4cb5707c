"""Scaling of raster values to reflectance (geodino.data.geotiff rules): data-type defaults, the Sentinel-2 processing
baseline offset, Landsat Collection 2 rules, the implausible-scaling warning, NaN as nodata, and one-file-per-band
products (Sentinel-2 L1C / L2A incl. the SAFE layout, Landsat Collection 2 Level-1 / Level-2) stacked by their
naming, on tiny rasters written here in each product's real file naming."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes.rasters import const_bands, write_tif
from omegaconf import OmegaConf

from geodino.contract import Contract
from geodino.data.geotiff import default_scale, read_scaled
from geodino.data.sources import build_source
from geodino.data.sources.raster import RasterSource
from geodino.data.stats import band_statistics, write_stats_file
from geodino.errors import DataError

UTM = dict(epsg=32631, left=600000, top=5_000_640)


def raster_cfg(paths, **kw):
    base = dict(name="test", kind="raster", paths=[str(p) for p in paths], filename_glob="*.tif", bands=None,
                sensor=None, chip_size=16, scale=None, offset=None, mean=None, std=None, stats_file=None,
                nodata_max_fraction=0.5, samples_per_epoch=64, chip_list=None)
    base.update(kw)
    return OmegaConf.create(base)


def medians(x: torch.Tensor) -> list[float]:
    return [float(b.median()) for b in x]


# ------------------------------------------------------------------------------------------------
# Data-type defaults, data.scale checks, the implausible-scaling warning
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,values,scale", [(np.uint8, (51, 102), 255.0), (np.uint16, (1000, 2500), 10000.0),
                                                (np.float32, (0.2, 0.4), 1.0)])
def test_default_scale_follows_the_data_type(tmp_path, dtype, values, scale, caplog):
    write_tif(tmp_path / "a.tif", const_bands(values, 32, dtype), **UTM, res=10, descriptions=["B04", "B08"])
    with caplog.at_level(logging.WARNING, logger="geodino"):
        info = build_source(raster_cfg([tmp_path]))
    assert info.scale == scale and info.offset == 0.0 and default_scale(dtype) == scale
    expected = [v / scale for v in values]  # float reflectance stays itself, not 1e-5
    np.testing.assert_allclose(medians(info.source[0]), expected, rtol=1e-5)
    np.testing.assert_allclose(info.mean, expected, rtol=1e-5)
    assert f"/ {scale:g}" in info.input_scale and "implausible" not in caplog.text
    x, valid, meta = read_scaled(tmp_path / "a.tif")  # segmentation's reader: the same rule
    assert meta["scale"] == scale and valid.all() and np.allclose(x[:, 0, 0], expected, rtol=1e-5)
    assert default_scale(np.int16) == default_scale(np.uint32) == 10000.0 and default_scale(np.float64) == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, "nan"])
def test_a_scale_that_is_not_positive_is_refused(tmp_path, bad):
    write_tif(tmp_path / "a.tif", const_bands((1000,), 32), **UTM, res=10)
    with pytest.raises(DataError, match=f"data.scale={bad} must be a positive number"):
        build_source(raster_cfg([tmp_path], scale=bad))


def test_implausible_scaling_is_warned_once_naming_file_band_and_a_scale(tmp_path, caplog):
    write_tif(tmp_path / "refl.tif", const_bands((0.05, 0.3), 32, np.float32), **UTM, res=10, nodata=None,
              descriptions=["B04", "B08"])
    with caplog.at_level(logging.WARNING, logger="geodino"):
        info = build_source(raster_cfg([tmp_path], scale=10000.0))  # float reflectance divided again
    warnings = [r.getMessage() for r in caplog.records if "implausible" in r.getMessage()]
    assert len(warnings) == 1 and "refl.tif" in warnings[0] and "B04" in warnings[0]
    assert "DN / 10000" in warnings[0] and "data.scale=1" in warnings[0]
    assert info.source.check_scaling() == warnings[0] and len(caplog.records) == 1  # once per source
    caplog.clear()
    write_tif(tmp_path / "dn" / "dn.tif", const_bands((900, 30000), 32), **UTM, res=10, descriptions=["B04", "B08"])
    with caplog.at_level(logging.WARNING, logger="geodino"):
        build_source(raster_cfg([tmp_path / "dn"], scale=255.0))  # 16-bit DN / 255: clipped
    assert "band B04's pixels exceed 1" in caplog.text and "data.scale=65535" in caplog.text


# ------------------------------------------------------------------------------------------------
# Sentinel-2: the processing-baseline offset (04.00, January 2022)
# ------------------------------------------------------------------------------------------------

S2_OLD = "T31UFQ_20200101T103421"
S2_NEW = "T31UFQ_20230105T103421"
S2_REFL = {"B02": 0.05, "B03": 0.08, "B04": 0.06, "B05": 0.12, "B08": 0.3}


def write_s2(folder: Path, scene: str, offset: int = 0, suffix: str = "", tags=None, bands=S2_REFL, safe=False):
    """One file per band: reflectance * 10000 - offset (the DN of that baseline), 10 m bands 64 px, 20 m 32 px."""
    for b, refl in bands.items():
        res = 20 if b == "B05" else 10
        name = f"{scene}_{b}" + (f"_{res}m" if suffix else "") + ".jp2"
        where = folder / f"R{res}m" if safe else folder
        write_tif(where / name, np.full((640 // res, 640 // res), round(refl * 10000) - offset, np.uint16), **UTM,
                  res=res, tags=tags)


def test_sentinel2_baseline_04_offset_from_tags_names_and_product_metadata(tmp_path):
    write_s2(tmp_path / "old", S2_OLD)
    old = RasterSource([tmp_path / "old"], chip_size=16, sensor="sentinel2")
    assert old.offset == 0.0 and old.scale == 10000.0
    reference = medians(old[0])
    np.testing.assert_allclose(reference, list(S2_REFL.values()), atol=1e-4)
    write_s2(tmp_path / "tag", S2_NEW, offset=-1000, tags={"BOA_ADD_OFFSET": "-1000"})
    write_s2(tmp_path / "baseline", S2_NEW, offset=-1000, tags={"PROCESSING_BASELINE": "04.00"})
    write_s2(tmp_path / "S2B_MSIL1C_20230105T103421_N0509_R108_T31UFQ_20230105T123018.SAFE", S2_NEW, offset=-1000)
    safe = tmp_path / "S2B_MSIL2A_20230105T103421_N9999_R108_T31UFQ_20230105T130501.SAFE"
    (safe / "MTD_MSIL2A.xml").parent.mkdir(parents=True)
    (safe / "MTD_MSIL2A.xml").write_text('<x><PROCESSING_BASELINE>05.09</PROCESSING_BASELINE>'
                                         '<BOA_ADD_OFFSET band_id="1">-1000</BOA_ADD_OFFSET></x>')
    write_s2(safe / "GRANULE" / "L2A_T31UFQ_A039563_20230105T103418" / "IMG_DATA", S2_NEW, offset=-1000, suffix="m",
             safe=True)
    for folder, why in [("tag", "BOA_ADD_OFFSET"), ("baseline", "processing baseline 04.00"),
                        ("S2B_MSIL1C_20230105T103421_N0509", "N0509"), (safe.name, "MTD_MSIL2A.xml")]:
        path = next(tmp_path.glob(folder + "*"))
        info = build_source(raster_cfg([path], sensor="sentinel2"))
        assert info.offset == -1000.0 and info.scale == 10000.0, folder
        assert why in info.input_scale and "(DN - 1000) / 10000" in info.input_scale
        np.testing.assert_allclose(medians(info.source[0]), reference, atol=1e-4)  # the same reflectance
        contract = info.contract(Contract("vit_test", "vit", {"in_chans": 5}, mean=[0] * 5, std=[1] * 5))
        assert (contract.scale, contract.offset) == (10000.0, -1000.0)
        assert Contract.from_dict(contract.to_dict()).offset == -1000.0
    # data.offset overrides the detection
    forced = build_source(raster_cfg([tmp_path / "tag"], sensor="sentinel2", offset=0))
    assert forced.offset == 0.0 and medians(forced.source[0])[0] == pytest.approx(0.15, abs=1e-4)
    x, _, meta = read_scaled(next(tmp_path.glob("S2B_MSIL1C*")) / f"{S2_NEW}_B04.jp2")  # segmentation's reader
    assert meta["offset"] == -1000.0 and np.allclose(x, 0.06, atol=1e-4)
    # a contract written before scale/offset existed reads back without them
    old_dict = {k: v for k, v in contract.to_dict().items() if k not in ("scale", "offset")}
    assert (Contract.from_dict(old_dict).scale, Contract.from_dict(old_dict).offset) == (None, 0.0)


def test_scenes_on_both_sides_of_the_baseline_are_read_apart_and_alike(tmp_path, caplog):
    write_s2(tmp_path, S2_OLD)  # the same footprint: torchgeo alone would mosaic the two
    write_s2(tmp_path, S2_NEW, offset=-1000, tags={"RADIO_ADD_OFFSET": "-1000"})
    src = RasterSource([tmp_path], chip_size=16, sensor="sentinel2", length=40)
    assert sorted(s.offset for s in src.scalings) == [-1000.0, 0.0] and len(src.files) == 2
    for i in range(12):
        np.testing.assert_allclose(medians(src[i]), list(S2_REFL.values()), atol=1e-4)
    write_s2(tmp_path / "unknown", S2_NEW, offset=-1000)  # recent, but nothing says which baseline
    with caplog.at_level(logging.WARNING, logger="geodino"):
        RasterSource([tmp_path / "unknown"], chip_size=16, sensor="sentinel2")
    assert "carry no processing baseline" in caplog.text and "data.offset=-1000" in caplog.text


def test_sentinel2_l2a_safe_tree_and_resolution_suffixes_are_stacked(tmp_path):
    granule = tmp_path / "S2A_MSIL2A_20200101T103421_N0213_R108_T31UFQ_20200101T120000.SAFE" / "GRANULE" / \
        "L2A_T31UFQ_A023615_20200101T103418" / "IMG_DATA"
    write_s2(granule, S2_OLD, suffix="m", safe=True)
    # the same band resampled at 20 m and 60 m (read at its native 10 m), and auxiliary products (never bands)
    write_tif(granule / "R20m" / f"{S2_OLD}_B02_20m.jp2", np.full((32, 32), 9999, np.uint16), **UTM, res=20)
    write_tif(granule / "R60m" / f"{S2_OLD}_B02_60m.jp2", np.full((11, 11), 9999, np.uint16), **UTM, res=60)
    write_tif(granule / "R20m" / f"{S2_OLD}_SCL_20m.jp2", np.full((32, 32), 4, np.uint8), **UTM, res=20)
    write_tif(granule / "R10m" / f"{S2_OLD}_TCI_10m.jp2", np.full((3, 64, 64), 90, np.uint8), **UTM, res=10)
    src = RasterSource([tmp_path], chip_size=16, sensor="sentinel2")
    assert src.band_names == list(S2_REFL) and len(src.files) == 1 and src.offset == 0.0  # N0213: before 04.00
    np.testing.assert_allclose(medians(src[0]), list(S2_REFL.values()), atol=1e-4)
    flat = tmp_path / "flat"  # L2A band files side by side, with their resolution suffixes
    write_s2(flat, S2_OLD, suffix="m")
    assert RasterSource([flat], chip_size=16, sensor="sentinel2").band_names == list(S2_REFL)
    preview = src.preview(160)  # named-sensor sources give the training figure its preview
    assert preview.shape == (5, 64, 64) and torch.isfinite(preview).all()


# ------------------------------------------------------------------------------------------------
# Landsat Collection 2 Level-1 / Level-2 folders
# ------------------------------------------------------------------------------------------------

def write_landsat(folder: Path, product: str, bands: dict[str, int], aux=("QA_PIXEL", "QA_RADSAT")) -> None:
    for b, dn in bands.items():
        write_tif(folder / f"{product}_{b}.TIF", np.full((64, 64), dn, np.uint16), **UTM, res=30)
    for a in aux:
        write_tif(folder / f"{product}_{a}.TIF", np.full((64, 64), 21824, np.uint16), **UTM, res=30)


def test_landsat_level2_and_level1_folders_stack_their_bands_and_ignore_qa(tmp_path):
    l2 = {**{f"SR_B{i}": 8000 + 1000 * i for i in range(1, 8)}, "ST_B10": 44000}
    write_landsat(tmp_path / "l2", "LC08_L2SP_199026_20200101_20200110_02_T1", l2, aux=("QA_PIXEL", "SR_QA_AEROSOL"))
    info = build_source(raster_cfg([tmp_path / "l2"], sensor="landsat8"))
    assert info.band_names == [f"SR_B{i}" for i in range(1, 8)]  # reflective bands by default, QA never
    assert info.scale == pytest.approx(1 / 2.75e-5) and info.offset == pytest.approx(-0.2 / 2.75e-5)
    np.testing.assert_allclose(medians(info.source[0]), [2.75e-5 * (8000 + 1000 * i) - 0.2 for i in range(1, 8)],
                               atol=1e-5)
    assert info.rgb_indices == (3, 2, 1)
    l1 = {f"B{i}": 10000 + 1000 * i for i in range(1, 12)}
    write_landsat(tmp_path / "l1", "LC09_L1TP_199026_20220101_20220110_02_T1", l1,
                  aux=("QA_PIXEL", "QA_RADSAT", "SAA", "SZA", "VAA", "VZA"))
    src = RasterSource([tmp_path / "l1"], chip_size=16, sensor="landsat9")
    assert src.band_names == [f"B{i}" for i in range(1, 10)]  # thermal B10 / B11 only when asked for
    np.testing.assert_allclose(medians(src[0]), [2e-5 * (10000 + 1000 * i) - 0.1 for i in range(1, 10)], atol=1e-5)
    assert src.preview(32).shape == (9, 32, 32)


def test_single_band_files_that_do_not_match_the_sensor_are_refused_with_the_expected_names(tmp_path):
    for name in ("LC08_xxx_QA_PIXEL.TIF", "LC08_xxx_B4.TIF", "LC08_xxx_B5.TIF"):
        write_tif(tmp_path / "odd" / name, np.full((64, 64), 9000, np.uint16), **UTM, res=30)
    with pytest.raises(DataError) as e:
        RasterSource([tmp_path / "odd"], chip_size=16, sensor="landsat8")
    msg = str(e.value)
    assert "expected files named like LC08_L2SP_<path><row>_<date>" in msg and "SR_B<n>.TIF" in msg
    assert "LC08_xxx_QA_PIXEL.TIF" in msg
    write_landsat(tmp_path / "qa", "LC08_L2SP_199026_20200101_20200110_02_T1", {})  # auxiliary files only
    with pytest.raises(DataError, match="only auxiliary files"):
        RasterSource([tmp_path / "qa"], chip_size=16, sensor="landsat8")
    # without a sensor: per-band files are not a 1-band data set (tiles of one band are)
    write_landsat(tmp_path / "l2", "LC08_L2SP_199026_20200101_20200110_02_T1", {"SR_B4": 9000, "SR_B5": 9500})
    with pytest.raises(DataError, match="set data.sensor=landsat8"):
        build_source(raster_cfg([tmp_path / "l2"], filename_glob="*.TIF"))
    for i in range(2):
        write_tif(tmp_path / "tiles" / f"tile{i}_B8.tif", np.full((64, 64), 9000, np.uint16), **UTM, res=30)
    assert RasterSource([tmp_path / "tiles"], chip_size=16).band_names == ["band_1"]


# ------------------------------------------------------------------------------------------------
# NaN is nodata
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodata", [float("nan"), None])
def test_nan_pixels_are_nodata_statistics_finite_chips_filled(tmp_path, nodata):
    data = const_bands((0.1, 0.4), 64, np.float32)
    data[:, :, :24] = np.nan  # the left 3/8 of the raster
    data[1, 40:, 40:] = np.nan  # NaN in one band only
    write_tif(tmp_path / "refl.tif", data, **UTM, res=10, nodata=nodata, descriptions=["B04", "B08"])
    src = RasterSource([tmp_path], chip_size=32, nodata_max_fraction=1.0, seed=3)
    info_px = {}
    mean, std = band_statistics(src, n=12, info=info_px)
    np.testing.assert_allclose(mean, [0.1, 0.4], rtol=1e-5)
    np.testing.assert_allclose(std, 0, atol=1e-5)
    assert info_px["nodata_pixels_excluded"] > 0
    raw = next(r for r in map(src.chip, range(10)) if torch.isnan(r).any())
    assert (~src.valid_mask(raw)).sum() == torch.isnan(raw).any(0).sum()
    info = build_source(raster_cfg([tmp_path], chip_size=32, nodata_max_fraction=1.0))
    for i in range(8):
        x, valid = info.source.item_with_mask(i)
        assert torch.isfinite(x).all() and torch.isfinite(info.source[i]).all()
        # nodata takes the band mean, so it normalises to 0
        assert torch.allclose(x[:, ~valid], torch.tensor(info.mean)[:, None], atol=1e-6)
    from geodino.verbs.curate import run_stats

    out = run_stats(OmegaConf.create({"data": raster_cfg([tmp_path], chip_size=32, nodata_max_fraction=1.0),
                                      "seed": 0, "stats_chips": 6, "out": str(tmp_path / "stats")}), progress=False)
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"band_stats.json holds {c}"))
    assert all(math.isfinite(v) for v in doc["mean"] + doc["std"]) and doc["scale"] == 1.0


def test_band_stats_file_refuses_non_finite_values(tmp_path):
    with pytest.raises(DataError, match="not finite for B08"):
        write_stats_file(tmp_path / "s.json", ["B04", "B08"], [0.1, float("nan")], [0.1, 0.1])
    assert not (tmp_path / "s.json").exists()
