"""`geodino segment` writes a Cloud-Optimized GeoTIFF by default (issue #15): internal tiles, overviews, the COG
layout, and the same labels, colours, tags and score scaling as the plain GeoTIFF of ``format=gtiff``; with
``vector=true`` a GeoPackage of the label polygons whose areas add up to the labelled pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from geodino import cli

PROMPTS = ["building", "road", "water"]


@pytest.fixture
def big_scene(tmp_path):
    from fakes.synthetic import texture_scene, write_geotiff

    img, _ = texture_scene(300, 320, np.random.default_rng(0))  # over one 256-px block: GDAL makes an overview
    img[:, :16, :16] = 0
    return write_geotiff(tmp_path / "scene.tif", img, nodata=0)


def _segment(ckpt, inp, out, *extra):
    return cli.main(["segment", f"checkpoint={ckpt}", f"input={inp}", f"prompts=[{','.join(PROMPTS)}]",
                     "progress=false", "tile=128", "overlap=16", "preview=false", f"out={out}", *extra])


def test_segment_writes_a_valid_cog_by_default_and_a_plain_geotiff_on_request(micro4, big_scene, tmp_path):
    cog, plain = tmp_path / "cog.tif", tmp_path / "plain.tif"
    assert _segment(micro4, big_scene, cog) == 0
    assert _segment(micro4, big_scene, plain, "format=gtiff") == 0
    with rasterio.open(cog) as c, rasterio.open(plain) as p:
        assert c.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"  # GDAL's mark: header and IFDs first
        assert p.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG"
        assert c.profile["tiled"] and (c.profile["blockxsize"], c.profile["blockysize"]) == (256, 256)
        assert c.overviews(1) == [2] and c.overviews(2) == [2] and p.overviews(1) == []
        np.testing.assert_array_equal(c.read(), p.read())
        assert c.nodata == p.nodata == 0 and c.descriptions == ("labels", "score")
        assert c.colormap(1)[1] == p.colormap(1)[1] and c.scales == p.scales and c.offsets == p.offsets
        assert json.loads(c.tags()["CLASSES"]) == PROMPTS
        assert c.crs == p.crs and c.transform == p.transform
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cog.summary.json", "cog.tif", "plain.summary.json",
                                                          "plain.tif", "scene.tif"]  # no streaming leftovers


def test_vector_output_is_a_geopackage_of_class_polygons(micro4, big_scene, tmp_path):
    gpd = pytest.importorskip("geopandas", reason="vector=true writes the GeoPackage with geopandas")
    out = tmp_path / "labels.tif"
    assert _segment(micro4, big_scene, out, "vector=true", "background=0.4") == 0
    summary = json.loads((tmp_path / "labels.summary.json").read_text())
    gdf = gpd.read_file(tmp_path / "labels.gpkg", layer="labels")
    assert len(gdf) == summary["polygons"] > 0
    with rasterio.open(out) as src:
        labels, res, crs = src.read(1), src.res, src.crs
    assert gdf.crs == crs
    assert set(gdf["class"]) <= set(PROMPTS) | {"background"}
    for value, name in {**{i + 1: p for i, p in enumerate(PROMPTS)}, 4: "background"}.items():
        area = gdf.loc[gdf["value"] == value].area.sum()
        assert area == pytest.approx((labels == value).sum() * res[0] * res[1], rel=1e-9), name
        assert (gdf.loc[gdf["value"] == value, "class"] == name).all()
    assert not (gdf["value"] == 0).any()  # nodata is no polygon
