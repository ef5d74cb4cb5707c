"""`geodino curate action=embed` writes the chips' footprints as GeoParquet beside the embeddings (issue #15): one row
per embedding row, each footprint exactly the window the chip was read from (checked against the raster with
rasterio), the CRS in the GeoParquet metadata, valid fractions from the pixels; chip stores too; without geopandas
the embeddings are written and one line says why the footprints are not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes.rasters import write_tif

from geodino import cli
from geodino.data.curation.embed import write_footprints
from geodino.data.lists import read_chip_list

gpd = pytest.importorskip("geopandas", reason="chips.parquet is written with geopandas (geodino[vector])")
pytest.importorskip("pyarrow", reason="geopandas writes Parquet through pyarrow (geodino[vector])")
rasterio = pytest.importorskip("rasterio")

CHIP = 32
COMMON = ["progress=false", "batch_size=8", "data=sat", f"data.chip_size={CHIP}", "data.mean=[0.3,0.3,0.3]",
          "data.std=[0.2,0.2,0.2]", "data.nodata_max_fraction=0.9"]


@pytest.fixture
def rasters(tmp_path):
    """Two 3-band uint16 scenes in EPSG:32633, every pixel distinct, the first with a nodata corner."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, 10000, size=(3, 80, 96), dtype=np.uint16)
    a[:, :30, :40] = 0
    b = rng.integers(1, 10000, size=(3, 64, 64), dtype=np.uint16)
    write_tif(tmp_path / "data" / "a.tif", a, 32633, left=500000, top=4000000, res=10)
    write_tif(tmp_path / "data" / "b.tif", b, 32633, left=520000, top=3990000, res=10)
    return tmp_path / "data"


def _window_pixels(path, bounds):
    """The pixels of `path` under `bounds`, which must be a whole-pixel CHIP x CHIP window."""
    from rasterio.windows import from_bounds

    with rasterio.open(path) as ds:
        win = from_bounds(*bounds, transform=ds.transform)
        for v in (win.col_off, win.row_off, win.width, win.height):
            assert abs(v - round(v)) < 1e-6, (path, bounds, win)
        assert (round(win.width), round(win.height)) == (CHIP, CHIP)
        return ds.read(window=win.round_offsets().round_lengths())


def test_embed_writes_footprints_that_are_the_chips_windows(rasters, tmp_path, capsys):
    out = tmp_path / "pool"
    assert cli.main(["curate", "action=embed", f"data.paths=[{rasters}]", "pool_size=12", f"out={out}",
                     *COMMON]) == 0
    assert "chips.parquet" in capsys.readouterr().out
    emb = np.load(out / "embeddings.npy")
    chips, _ = read_chip_list(out / "items.txt")
    gdf = gpd.read_parquet(out / "chips.parquet")
    assert len(gdf) == len(emb) == 12 and gdf["row"].tolist() == list(range(12))
    assert gdf["chip"].tolist() == chips.tolist()
    assert gdf.crs.to_epsg() == 32633
    import pyarrow.parquet as pq

    geo = json.loads(pq.read_schema(out / "chips.parquet").metadata[b"geo"])
    assert geo["columns"]["geometry"]["crs"]["id"]["code"] == 32633  # the CRS in the GeoParquet metadata
    doc = json.loads((out / "embed.json").read_text())
    assert doc["footprints"] == {"file": "chips.parquet", "crs": "EPSG:32633"}
    from geodino.data.sources import build_source

    src = build_source(cli.compose("curate", [f"data.paths=[{rasters}]", *COMMON[1:]]).data).source
    files = set()
    for r in gdf.itertuples():
        assert r.geometry.equals(r.geometry.envelope) and r.geometry.area == pytest.approx((CHIP * 10) ** 2)
        pixels = _window_pixels(r.file, r.geometry.bounds)
        np.testing.assert_array_equal(pixels, src.chip(int(r.chip)).numpy())  # the same pixels the chip holds
        assert r.valid_fraction == pytest.approx(float((pixels != 0).any(0).mean()))
        files.add(r.file.rsplit("/", 1)[-1])
    assert files == {"a.tif", "b.tif"} and (gdf["valid_fraction"] < 1).any()

    # a chip store cut from the same rasters: the same footprints, addressed by the store's chips
    store = tmp_path / "store"
    assert cli.main(["curate", "action=chip", f"data.paths=[{rasters}]", "n_chips=6", f"out={store}", "stats_chips=2",
                     *COMMON]) == 0
    out2 = tmp_path / "pool2"
    assert cli.main(["curate", "action=embed", "data=chips", f"data.paths=[{store}]", f"out={out2}",
                     *[c for c in COMMON if not c.startswith(("data=", "data.chip_size", "data.nodata"))]]) == 0
    g2 = gpd.read_parquet(out2 / "chips.parquet")
    assert np.load(out2 / "embeddings.npy").shape[0] == len(g2) == 6 and g2.crs.to_epsg() == 32633
    assert read_chip_list(out2 / "items.txt")[0].tolist() == g2["chip"].tolist() == list(range(6))
    for r, first in zip(g2.itertuples(), gdf.itertuples()):  # the store's chip i is the source's chip i
        assert r.geometry.equals(first.geometry) and r.file == first.file
    # its embeddings select chips of the store (a chip list that data=chips reads)
    assert cli.main(["curate", "action=balance", f"embeddings={out2}", f"out={tmp_path / 'bal'}", "n_samples=3",
                     "levels=[2]", "progress=false"]) == 0
    picked, header = read_chip_list(tmp_path / "bal" / "balanced.txt")
    assert len(picked) == 3 and set(picked.tolist()) <= set(range(6)) and header["kind"] == "chips"
    cfg = cli.compose("train", ["data=chips", f"data.paths=[{store}]", f"data.chip_list={tmp_path / 'bal' / 'balanced.txt'}"])
    assert build_source(cfg.data).source.chip_index(1) == int(picked[1])


def test_without_geopandas_the_embeddings_are_written_and_one_line_says_why(rasters, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "geopandas", None)  # import geopandas -> ImportError
    out = tmp_path / "pool"
    assert cli.main(["curate", "action=embed", f"data.paths=[{rasters}]", "pool_size=4", f"out={out}", *COMMON]) == 0
    assert np.load(out / "embeddings.npy").shape[0] == 4 and not (out / "chips.parquet").exists()
    said = [line for line in capsys.readouterr().err.splitlines() if "chips.parquet" in line]
    assert len(said) == 1 and said[0].endswith("WARNING no chips.parquet (chip footprints) written: geopandas is not "
                                               "installed; pip install 'geodino[vector]'")
    assert json.loads((out / "embed.json").read_text())["footprints"] is None


def test_footprints_in_several_crss_go_to_epsg4326_with_a_crs_column(tmp_path):
    fps = [{"chip": 0, "file": "a.tif", "bounds": [500000, 4000000, 500320, 4000320], "crs": "EPSG:32633",
            "valid_fraction": 1.0},
           {"chip": 1, "file": "b.tif", "bounds": [10, 45, 10.01, 45.01], "crs": "EPSG:4326", "valid_fraction": 0.5}]
    gdf = gpd.read_parquet(write_footprints(tmp_path / "chips.parquet", fps))
    assert gdf.crs.to_epsg() == 4326 and gdf["crs"].tolist() == ["EPSG:32633", "EPSG:4326"]
    assert gdf["row"].tolist() == [0, 1] and gdf["valid_fraction"].tolist() == [1.0, 0.5]
    want = gpd.GeoSeries.from_xy([500160], [4000160], crs=32633).to_crs(4326)[0]
    assert gdf.geometry[0].contains(want)
    assert gdf.geometry[1].bounds == pytest.approx((10, 45, 10.01, 45.01))


def test_rasters_in_two_crss_give_footprints_on_the_first_ones_grid(tmp_path):
    """torchgeo reads every chip on the first raster's grid (the other raster is warped onto it): the footprints are
    the chips' windows in that one CRS, and a chip of the other raster lies inside its reprojected bounds."""
    from rasterio.warp import transform_bounds

    rng = np.random.default_rng(1)
    write_tif(tmp_path / "d" / "a.tif", rng.integers(1, 9999, (3, 64, 64), dtype=np.uint16), 32633, 500000, 4000000, 10)
    write_tif(tmp_path / "d" / "b.tif", rng.integers(1, 9999, (3, 64, 64), dtype=np.uint16), 32634, 200000, 4000000, 10)
    out = tmp_path / "pool"
    assert cli.main(["curate", "action=embed", f"data.paths=[{tmp_path / 'd'}]", "pool_size=16", f"out={out}",
                     *COMMON]) == 0
    gdf = gpd.read_parquet(out / "chips.parquet")
    assert gdf.crs.to_epsg() == 32633 and "crs" not in gdf.columns
    names = gdf["file"].str.rsplit("/", n=1).str[-1]
    assert set(names) == {"a.tif", "b.tif"}
    for r in gdf[names == "b.tif"].itertuples():
        with rasterio.open(r.file) as ds:
            x0, y0, x1, y1 = transform_bounds(ds.crs, "EPSG:32633", *ds.bounds)
        bx0, by0, bx1, by1 = r.geometry.bounds
        assert x0 - 1 <= bx0 and y0 - 1 <= by0 and bx1 <= x1 + 1 and by1 <= y1 + 1
        assert r.geometry.area == pytest.approx((CHIP * 10) ** 2)
