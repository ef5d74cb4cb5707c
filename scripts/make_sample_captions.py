"""Build the caption sample and its labelled open-vocabulary folder from the packaged Sentinel-2 sample.

    python scripts/make_sample_captions.py            # writes geodino/data/sample/captions/ and .../ov/
    python scripts/make_sample_captions.py --out DIR  # elsewhere

Input: ``geodino/data/sample/sentinel2_l1c_sample.tif`` (13 bands, 256 x 256 px; its source and licence are in
geodino/data/sample/README.md and sources.json). Nothing is downloaded; the output is deterministic.

* ``captions/chips/r<row>_c<col>.tif``: 32 x 32 px windows of all 13 bands (uint16 DN, band descriptions, the
  scene's CRS and geotransform) at a stride of 24 px inside the **top half** (rows 0-127), the half the
  ``data=sample_sat`` pretraining chips come from: 5 x 10 = 50 chips.
* ``captions/captions.jsonl``: per chip, captions naming the land-cover classes (geodino.data.sample.landcover:
  NDWI / NDVI thresholds per pixel) that cover at least 25 % of it, most frequent first, in three wordings
  (``{a} and {b}``; ``a satellite image of {a} and {b}``; ``mostly {a}`` / ``{a} with some {b}``), one drawn per
  sample.
* ``ov/``: the **bottom half** (rows 128-255, never in a chip) as two 128 x 128 px images with per-pixel label
  rasters of the same rule and ``classes.txt``: the layout ``geodino eval ov`` scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geodino.data.sample import sample_sat_path  # noqa: E402
from geodino.data.sample.landcover import LAND_COVER_CLASSES, land_cover  # noqa: E402

CHIP, STRIDE, TOP = 32, 24, 128
MIN_FRACTION = 0.25


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def captions_for(labels: np.ndarray) -> list[str]:
    """The captions of one chip from its per-pixel land-cover labels (module doc)."""
    frac = np.bincount(labels.ravel(), minlength=len(LAND_COVER_CLASSES)) / labels.size
    order = [int(c) for c in np.argsort(-frac, kind="stable") if frac[c] >= MIN_FRACTION]
    names = [LAND_COVER_CLASSES[c] for c in order]
    text = _join(names)
    third = (f"mostly {names[0]}" if frac[order[0]] >= 0.6 or len(names) == 1
             else f"{names[0]} with some {_join(names[1:])}")
    return [text, f"a satellite image of {text}", third]


def _write(path: Path, arr: np.ndarray, src, window: Window, descriptions, nodata) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = dict(driver="GTiff", dtype=arr.dtype.name, count=arr.shape[0], width=arr.shape[2], height=arr.shape[1],
                crs=src.crs, transform=src.window_transform(window), nodata=nodata, compress="deflate",
                predictor=2, zlevel=9)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(arr)
        dst.descriptions = tuple(descriptions)


def build(out: Path) -> dict:
    with rasterio.open(sample_sat_path()) as src:
        names = list(src.descriptions)
        b = {n: i for i, n in enumerate(names)}
        scene = src.read()
        refl = scene.astype(np.float64) / 10000.0  # the sample's scaling (uint16 DN / 10000, offset 0)
        labels = land_cover(refl[b["B04"]], refl[b["B03"]], refl[b["B08"]])
        rows, counts = [], np.zeros(len(LAND_COVER_CLASSES), np.int64)
        for y in range(0, TOP - CHIP + 1, STRIDE):
            for x in range(0, scene.shape[2] - CHIP + 1, STRIDE):
                name = f"chips/r{y:03d}_c{x:03d}.tif"
                _write(out / "captions" / name, scene[:, y:y + CHIP, x:x + CHIP], src, Window(x, y, CHIP, CHIP),
                       names, src.nodata)
                lab = labels[y:y + CHIP, x:x + CHIP]
                counts += np.bincount(lab.ravel(), minlength=len(counts))
                rows.append({"path": name, "caption": captions_for(lab)})
        (out / "captions" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ov = out / "ov"
        (ov / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
        (ov / "classes.txt").write_text("\n".join(LAND_COVER_CLASSES) + "\n")
        half = scene.shape[2] // 2
        for i, x in enumerate((0, half)):
            w = Window(x, TOP, half, scene.shape[1] - TOP)
            _write(ov / "images" / f"south_{i}.tif", scene[:, TOP:, x:x + half], src, w, names, src.nodata)
            _write(ov / "labels" / f"south_{i}.tif", labels[None, TOP:, x:x + half].astype(np.uint8), src, w,
                   ["land cover"], 255)
    return {"chips": len(rows), "distinct_captions": len({r["caption"][0] for r in rows}),
            "chip_pixels_per_class": dict(zip(LAND_COVER_CLASSES, counts.tolist()))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "geodino" / "data" / "sample")
    args = p.parse_args()
    print(json.dumps(build(args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
