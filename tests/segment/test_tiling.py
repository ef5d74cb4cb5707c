"""Tiled inference: tile grids, ramp blending without seams, the `geodino segment` verb (GeoTIFF in, GeoTIFF +
preview out, CRS / transform / nodata kept) and bounded memory on a 6000 x 6000 raster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio
import torch

from geodino import cli
from geodino.segment.tiling import blend_tiles, ramp, tile_starts

PROMPTS = ["water", "forest", "buildings", "farmland"]


def test_tile_starts_cover_with_the_requested_overlap():
    for size in (1, 100, 512, 513, 1000, 1300, 6000):
        for tile, overlap in ((512, 64), (256, 32), (128, 0)):
            s = tile_starts(size, tile, overlap)
            t = min(tile, size)
            assert s[0] == 0 and s[-1] + t == size and s == sorted(set(s))
            for a, b in zip(s, s[1:]):
                assert a + t - b >= overlap  # neighbours overlap by at least `overlap`
    assert tile_starts(6000, 512, 64)[:3] == [0, 422, 844]  # 14 tiles, ~90 px overlaps, evenly spread
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 64, 64)


def test_ramps_sum_to_one_across_an_overlap():
    for mode in ("linear", "cosine"):
        a = ramp(100, 0, 30, mode)
        b = ramp(100, 30, 0, mode)
        np.testing.assert_allclose(a[70:] + b[:30], 1.0, atol=1e-6)
        assert a[0] == 1.0 and b[-1] == 1.0 and a[-1] < 0.05


def _run(h, w, tile, overlap, predict, image=None, blend="linear", k=2):
    image = np.random.default_rng(0).random((3, h, w), dtype=np.float32) if image is None else image
    out = np.full((k, h, w), np.nan, np.float32)
    hits = np.zeros((h, w), np.int32)

    def read(y, x, th, tw):
        return image[:, y:y + th, x:x + tw], np.ones((th, tw), bool)

    def emit(y, x, probs, valid):
        out[:, y:y + probs.shape[1], x:x + probs.shape[2]] = probs
        hits[y:y + probs.shape[1], x:x + probs.shape[2]] += 1

    stats = blend_tiles(h, w, tile, overlap, read, predict, emit, blend=blend)
    return image, out, hits, stats


@pytest.mark.parametrize("blend", ["linear", "cosine"])
def test_blending_is_seamless(blend):
    # a constant model gives a constant output across every seam
    _, out, hits, stats = _run(300, 410, 64, 24, lambda im, v: np.broadcast_to(
        np.array([0.7, 0.3], np.float32)[:, None, None], (2, *im.shape[1:])), blend=blend)
    assert stats["tiles"] > 20 and (hits == 1).all()
    np.testing.assert_allclose(out[0], 0.7, atol=1e-6)
    np.testing.assert_allclose(out[1], 0.3, atol=1e-6)
    # a per-pixel model (position-dependent output): tiled == whole image, so no seam anywhere
    image, out, hits, _ = _run(300, 410, 64, 24, lambda im, v: torch.from_numpy(im[:2] * 2 - 1), blend=blend)
    assert (hits == 1).all()
    np.testing.assert_allclose(out, image[:2] * 2 - 1, atol=1e-5)


def test_pending_memory_is_bounded_by_the_overlap_band():
    k = 8

    def predict(im, v):
        return np.zeros((k, *im.shape[1:]), np.float32)

    _, _, _, stats = _run(2000, 1500, 256, 32, predict, image=np.zeros((1, 2000, 1500), np.float32), k=k)
    full_stack = k * 2000 * 1500 * 4
    assert stats["peak_pending_bytes"] < full_stack / 15


def _raster(path, h, w, nodata=0, crs="EPSG:32633"):
    from rasterio.transform import from_origin

    from fakes.synthetic import texture_scene

    img, _ = texture_scene(h, w, np.random.default_rng(3))
    img[:, :10, :10] = nodata
    with rasterio.open(path, "w", driver="GTiff", dtype="uint8", count=4, width=w, height=h, crs=crs,
                       transform=from_origin(400000, 5100000, 20, 20), nodata=nodata) as dst:
        dst.write(img)
        dst.descriptions = ("R", "G", "B", "NIR")
    return path


def test_segment_raster_constant_model_has_no_seams(micro4, tmp_path):
    from geodino.segment.open_vocab import OpenVocabSegmenter
    from geodino.segment.run import segment_raster

    src = _raster(tmp_path / "in.tif", 700, 900)
    seg = OpenVocabSegmenter.from_checkpoint(micro4)
    const = torch.tensor([0.1, 0.6, 0.2, 0.1])[:, None, None]
    seg.predictor = lambda text: (lambda im, v: const.expand(4, *im.shape[1:]))
    summary = segment_raster(seg, src, PROMPTS, tmp_path / "out.tif", tile=128, overlap=32, progress=False)
    assert summary["tiles"] > 40
    with rasterio.open(tmp_path / "out.tif") as o:
        lab, score = o.read(1), o.read(2)
    valid = np.ones(lab.shape, bool)
    valid[:10, :10] = False
    assert (lab[valid] == 2).all() and (lab[~valid] == 0).all()  # "forest" = value 2; nodata 0
    assert (score[valid] == score[valid][0]).all() and score[valid][0] == 1 + round(0.6 * 253)


def test_segment_verb_writes_georeferenced_labels_scores_and_preview(micro4, tmp_path, capsys):
    src = _raster(tmp_path / "in.tif", 300, 420, nodata=255)
    out = tmp_path / "res" / "labels.tif"
    rc = cli.main(["segment", f"checkpoint={micro4}", f"input={src}", f"prompts=[{','.join(PROMPTS)}]",
                   f"out={out}", "tile=128", "overlap=32", "background=0.3", "progress=false"])
    assert rc == 0, capsys.readouterr().err
    with rasterio.open(src) as i, rasterio.open(out) as o:
        assert o.crs == i.crs and o.transform == i.transform and (o.width, o.height) == (i.width, i.height)
        assert o.nodata == 255 == i.nodata and o.count == 2 and o.dtypes == ("uint8", "uint8")
        lab = o.read(1)
        assert (lab[:10, :10] == 255).all() and set(np.unique(lab[10:, 10:])) <= {1, 2, 3, 4, 5}
        cmap = o.colormap(1)
        assert cmap[1][:3] != cmap[2][:3] and cmap[5][:3] == (128, 128, 128)
        assert json.loads(o.tags()["CLASSES"]) == PROMPTS and o.tags()["CLASS_3"] == "buildings"
        assert o.descriptions == ("labels", "score")
        prob = o.read(2)[20:, 20:].astype(float) * o.scales[1] + o.offsets[1]
        assert (prob >= 0.25 - 1e-2).all() and (prob <= 1 + 1e-6).all()
    summary = json.loads((out.parent / "labels.summary.json").read_text())
    assert summary["label_values"]["background"] == 5 and summary["pixels"]["nodata"] == 100
    assert sum(summary["pixels"].values()) == 300 * 420
    from PIL import Image

    png = Image.open(out.parent / "labels.preview.png")
    assert png.width > 420 and png.height >= 300  # map + legend

    # one-line errors
    rc = cli.main(["segment", f"checkpoint={micro4}", f"input={src}", "prompts=[]", f"out={tmp_path / 'x.tif'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "prompts=[" in err and len(err.strip().splitlines()) == 1
    three = tmp_path / "rgb.tif"
    with rasterio.open(three, "w", driver="GTiff", dtype="uint8", count=3, width=32, height=32) as d:
        d.write(np.zeros((3, 32, 32), np.uint8))
    rc = cli.main(["segment", f"checkpoint={micro4}", f"input={three}", "prompts=[a,b]", f"out={tmp_path / 'y.tif'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 bands; this model takes 4 (R, G, B, NIR)" in err


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np

    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024

    import torch
    from geodino.segment.open_vocab import OpenVocabSegmenter
    from geodino.segment.run import segment_raster

    torch.set_num_threads(1)  # a small model on a shared CPU: one thread avoids OpenMP barrier stalls
    ckpt, src, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    seg = OpenVocabSegmenter.from_checkpoint(ckpt)
    seg.segment(np.zeros((4, 512, 512), np.uint8), prompts)  # warm-up: model, thread pools, text embeddings
    base = rss()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    t0 = time.perf_counter()
    summary = segment_raster(seg, src, prompts, out, tile=512, overlap=64, progress=False)
    done.set()
    print(json.dumps({"base": base, "peak": max(peak[0], rss()), "seconds": time.perf_counter() - t0,
                      "pending": summary["peak_pending_bytes"]}))
""")


def test_6000px_raster_in_bounded_memory(micro4, tmp_path):
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from fakes.synthetic import texture_scene

    n = 6000
    src = tmp_path / "big.tif"
    block, _ = texture_scene(500, 500, np.random.default_rng(0))
    with rasterio.open(src, "w", driver="GTiff", dtype="uint8", count=4, width=n, height=n, crs="EPSG:32631",
                       transform=from_origin(300000, 5000000, 10, 10), nodata=0, tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate", zlevel=1) as dst:
        dst.descriptions = ("R", "G", "B", "NIR")
        row = np.tile(block, (1, 1, n // 500))
        row[:, :50, :50] = 0  # a nodata corner in every 500 px row band
        for y in range(0, n, 500):
            dst.write(row, window=Window(0, y, n, 500))
    prompts = ["water", "forest", "buildings", "farmland", "road", "cloud"]
    out = tmp_path / "big_labels.tif"
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(micro4), str(src), str(out), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    full_stack = len(prompts) * n * n * 4  # the float score stack at full resolution: 864 MB
    print(f"6000x6000: {m['seconds']:.1f} s ({m['seconds'] / 36:.2f} s/MP), RSS growth {growth / 2**20:.0f} MB "
          f"(full-res float stack {full_stack / 2**20:.0f} MB), pending cells {m['pending'] / 2**20:.1f} MB")
    assert growth < full_stack / 3
    with rasterio.open(src) as i, rasterio.open(out) as o:
        assert o.crs == i.crs and o.transform == i.transform and o.nodata == i.nodata == 0
        assert (o.width, o.height) == (n, n)
        corner = o.read(1, window=Window(0, 500, 60, 60))
        assert (corner[:50, :50] == 0).all() and (corner[55:, 55:] > 0).all()
