"""`geodino segment` never clobbers (issue #14 item 2): the labels are a .tif/.tiff, the preview and summary get
names that cannot collide (<stem>.preview.png, <stem>.summary.json), nothing overwrites the input, an existing
output needs overwrite=true, a failed write leaves nothing behind; one label convention for the API and the files
(item 10); a dino.txt model over a random backbone says so."""

from __future__ import annotations

import errno
import json
import logging
import os

import numpy as np
import pytest
import rasterio

import geodino
from geodino import cli
from geodino.segment.open_vocab import BACKGROUND, NODATA, api_labels, file_labels
from geodino.testing import cli_error_lines

PROMPTS = ["building", "road", "water", "forest"]


@pytest.fixture
def scene(tmp_path):
    from fakes.synthetic import texture_scene, write_geotiff

    img, _ = texture_scene(70, 90, np.random.default_rng(0))
    img[:, :8, :8] = 0  # nodata
    return write_geotiff(tmp_path / "scene.tif", img, nodata=0)


def _segment(ckpt, inp, *extra):
    return cli.main(["segment", f"checkpoint={ckpt}", f"input={inp}", f"prompts=[{','.join(PROMPTS)}]",
                     "progress=false", "tile=64", "overlap=16", *extra])


def _one_error(capsys) -> str:
    lines = cli_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: geodino segment: "), lines
    return lines[0]


def test_side_files_are_named_after_the_labels_and_outputs_need_overwrite(micro4, scene, tmp_path, capsys):
    out = tmp_path / "res" / "scene.tif"
    assert _segment(micro4, scene, f"out={out}") == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["scene.preview.png", "scene.summary.json", "scene.tif"]
    summary = json.loads((out.parent / "scene.summary.json").read_text())
    assert summary["out"] == str(out) and summary["preview"] == str(out.parent / "scene.preview.png")
    before = out.stat().st_mtime_ns
    capsys.readouterr()

    assert _segment(micro4, scene, f"out={out}") == 2
    assert _one_error(capsys).endswith(f"output {out} exists; overwrite=true replaces it")
    assert out.stat().st_mtime_ns == before
    assert _segment(micro4, scene, f"out={out}", "overwrite=true") == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["scene.preview.png", "scene.summary.json", "scene.tif"]


def test_out_must_be_a_geotiff_and_never_the_input(micro4, scene, tmp_path, capsys):
    data = scene.read_bytes()
    assert _segment(micro4, scene, f"out={scene}", "overwrite=true") == 2
    assert "would overwrite the input" in _one_error(capsys)
    for name in ("labels.png", "labels.json"):
        assert _segment(micro4, scene, f"out={tmp_path / name}") == 2
        assert "out must end in .tif or .tiff" in _one_error(capsys)
    # a side file landing on the input: input x.preview.png, out x.tif
    png_input = tmp_path / "x.preview.png"
    with rasterio.open(scene) as src:
        profile = {**src.profile, "driver": "PNG", "count": 3}
        rgb = src.read([1, 2, 3])
    with rasterio.open(png_input, "w", **{k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize",
                                                                                         "tiled", "interleave")}) as d:
        d.write(rgb)
    assert _segment(micro4, png_input, f"out={tmp_path / 'x.tif'}", "overwrite=true") == 2
    assert f"would overwrite the input {png_input}" in _one_error(capsys)
    assert scene.read_bytes() == data and not (tmp_path / "x.tif").exists()


def test_a_photo_input_keeps_its_name_free(micro3, tmp_path, capsys):
    from PIL import Image

    photo = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(photo)
    data = photo.read_bytes()
    assert _segment(micro3, photo, f"out={tmp_path / 'scene.tif'}") == 0, capsys.readouterr().err
    assert photo.read_bytes() == data  # the preview used to be written over scene.png
    assert (tmp_path / "scene.preview.png").is_file() and (tmp_path / "scene.summary.json").is_file()


def test_disk_full_leaves_no_partial_file_and_no_output_folder(micro4, scene, tmp_path, capsys, monkeypatch):
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)  # the summary JSON is the last file written
    out = tmp_path / "new" / "run" / "labels.tif"
    assert _segment(micro4, scene, f"out={out}") == 2
    monkeypatch.undo()
    msg = _one_error(capsys)
    assert f"no space left on device writing {out.parent / 'labels.summary.json'}" in msg
    assert not (tmp_path / "new").exists()  # no labels, no preview, no temporary file, no empty folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_api_and_cli_labels_are_one_convention(micro4, scene, tmp_path):
    seg = geodino.OpenVocabSegmenter.from_checkpoint(micro4)
    result = seg.segment(scene, PROMPTS, background=0.3, tile=64, overlap=16)
    assert set(np.unique(result.labels)) >= {NODATA} and (result.labels[:8, :8] == NODATA).all()
    out = tmp_path / "labels.tif"
    assert _segment(micro4, scene, f"out={out}", "background=0.3") == 0
    with rasterio.open(out) as o:
        written, nodata = o.read(1), o.nodata
    assert nodata == 0
    np.testing.assert_array_equal(written, result.file_labels(nodata=int(nodata)))
    np.testing.assert_array_equal(api_labels(written, len(PROMPTS), int(nodata)), result.labels)
    # the mapping itself: classes 0..K-1 -> 1..K, background -> K+1, nodata -> the nodata value
    api = np.array([[0, 3, BACKGROUND, NODATA]], np.int16)
    np.testing.assert_array_equal(file_labels(api, 4, 255), [[1, 4, 5, 255]])
    np.testing.assert_array_equal(api_labels(file_labels(api, 4, 0), 4, 0), api)
    with pytest.raises(geodino.errors.GeodinoError, match="differ from the labels 1..5"):
        file_labels(api, 4, 5)


def test_a_text_model_over_a_random_backbone_warns(micro3, tmp_path):
    import torch

    raw = torch.load(micro3, weights_only=False)
    raw["dinotxt"]["random_backbone"] = True  # what stage=text records without init= / model.weights
    ckpt = tmp_path / "random.pt"
    torch.save(raw, ckpt)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("geodino").addHandler(handler)
    try:
        geodino.OpenVocabSegmenter.from_checkpoint(ckpt)
    finally:
        logging.getLogger("geodino").removeHandler(handler)
    assert any("RANDOMLY initialised frozen backbone" in r.getMessage() for r in records)


def test_preview_colours_follow_class_names():
    """Water blue, vegetation green (forest darker), bare tan, built grey; unknown names and repeats get distinct
    palette colours."""
    from geodino.segment.run import class_colours

    water, forest, veg, bare, built, cats, river = class_colours(
        ["water", "dense vegetation", "low vegetation", "bare or built-up land", "buildings", "cats", "river"])
    assert water[2] > 150 and water[2] > water[0] + 100  # blue
    assert forest[1] > forest[0] + 50 and forest[1] > forest[2] + 50 and veg[1] > veg[0] + 50  # green
    assert forest != veg and sum(forest) < sum(veg)
    assert bare == (210, 180, 140) and built[0] == built[1] == built[2]  # tan, grey
    assert len({water, forest, veg, bare, built, cats, river}) == 7  # river: blue taken by water -> a palette colour
    assert class_colours(["forest", "trees"])[0] == class_colours(["Woodland"])[0]
    assert len(set(class_colours(25))) == 25
