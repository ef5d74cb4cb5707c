"""Synthetic scenes with known truth for open-vocabulary segmentation checks, demos and benchmarks.

Four land-cover textures (4 bands: R, G, B, NIR, uint8), distinct in colour and structure:

* ``water`` -- dark, smooth blue with low-frequency ripples, no NIR;
* ``forest`` -- dark green canopy blobs, high NIR;
* ``buildings`` -- grey ground with bright rectangular roofs on a jittered grid;
* ``farmland`` -- parallel crop stripes in yellow / brown / green, random orientation.

``texture_scene`` composes them in Voronoi regions (per-pixel truth); ``caption_chips`` writes single- and two-class
GeoTIFF chips with captions that name what is in them (for ``geodino train stage=text``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

CLASSES = ("water", "forest", "buildings", "farmland")
BANDS = ("R", "G", "B", "NIR")

_CAPTION_TEMPLATES_1 = ("{}", "a satellite image of {}", "an aerial view of {}", "{} seen from above",
                        "a remote sensing image of {}")
_CAPTION_TEMPLATES_2 = ("{} and {}", "a satellite image of {} and {}", "an aerial view of {} next to {}",
                        "{} beside {}")


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma, mode="wrap")


def _norm01(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / max(hi - lo, 1e-8)


def texture(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(4, h, w) float in [0, 1] for one class."""
    if name == "water":
        n = _norm01(_blur(rng.standard_normal((h, w)), 6.0))
        base = np.array([0.10, 0.22, 0.40, 0.03])[:, None, None]
        img = base + 0.06 * (n - 0.5)[None]
    elif name == "forest":
        n = _norm01(_blur(rng.standard_normal((h, w)), 1.5))
        crowns = (n > 0.5).astype(np.float64)
        base = np.array([0.08, 0.30, 0.10, 0.70])[:, None, None]
        img = base * (0.6 + 0.5 * crowns[None]) + 0.04 * (n - 0.5)[None]
    elif name == "buildings":
        img = np.empty((4, h, w))
        img[:] = np.array([0.45, 0.45, 0.45, 0.30])[:, None, None]
        img += 0.03 * rng.standard_normal((1, h, w))
        cell = 12
        for y in range(-cell, h, cell):
            for x in range(-cell, w, cell):
                y0, x0 = y + int(rng.integers(0, 4)), x + int(rng.integers(0, 4))
                hh, ww = int(rng.integers(5, 9)), int(rng.integers(5, 9))
                ys, xs = slice(max(y0, 0), max(min(y0 + hh, h), 0)), slice(max(x0, 0), max(min(x0 + ww, w), 0))
                roof = rng.choice([0.85, 0.75, 0.65])
                img[:3, ys, xs] = roof
                img[3, ys, xs] = 0.35
                # shadow
                ys2 = slice(max(min(y0 + hh, h), 0), max(min(y0 + hh + 2, h), 0))
                img[:3, ys2, xs] = 0.2
    elif name == "farmland":
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        u = xx * np.cos(theta) + yy * np.sin(theta)
        period = rng.uniform(7, 10)
        stripe = (np.floor(u / period) % 3).astype(int)
        colours = np.array([[0.75, 0.65, 0.30, 0.45], [0.50, 0.35, 0.20, 0.25], [0.45, 0.60, 0.25, 0.55]])
        img = colours[stripe].transpose(2, 0, 1)
        line = (np.abs((u % period) - period / 2) < 0.7)[None]
        img = img * np.where(line, 0.8, 1.0) + 0.02 * rng.standard_normal((1, h, w))
    else:
        raise ValueError(f"unknown texture '{name}'; choose one of {', '.join(CLASSES)}")
    return np.clip(img, 0, 1)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255), 1, 255).astype(np.uint8)  # 0 stays free for nodata


def texture_scene(h: int, w: int, rng: np.random.Generator, n_regions: int = 6,
                  classes: Sequence[str] = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """(image (4, h, w) uint8, truth (h, w) int64 class index) with Voronoi regions; every class appears."""
    k = len(classes)
    n_regions = max(n_regions, k)
    pts = rng.uniform([0, 0], [h, w], size=(n_regions, 2))
    labels_of_region = np.concatenate([np.arange(k), rng.integers(0, k, n_regions - k)])
    rng.shuffle(labels_of_region)
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    truth = labels_of_region[d.argmin(0)]
    img = np.zeros((4, h, w))
    for c in range(k):
        m = truth == c
        if m.any():
            img[:, m] = texture(classes[c], h, w, rng)[:, m]
    return to_uint8(img), truth.astype(np.int64)


def write_geotiff(path: str | Path, img: np.ndarray, bands: Sequence[str] = BANDS, nodata: float | None = 0,
                  transform=None, crs: str = "EPSG:32631") -> Path:
    import rasterio
    from rasterio.transform import from_origin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = img.shape
    prof = dict(driver="GTiff", dtype=img.dtype.name, count=c, width=w, height=h, crs=crs,
                transform=transform or from_origin(500000, 4500000, 10, 10), nodata=nodata)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(img)
        dst.descriptions = tuple(bands[:c])
    return path


def caption_chips(out_dir: str | Path, n: int = 200, size: int = 64, seed: int = 0, p_single: float = 0.5,
                  classes: Sequence[str] = CLASSES) -> Path:
    """Write ``n`` GeoTIFF chips (one or two classes, each covering >= 30 %) and ``captions.csv`` naming them."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        if rng.random() < p_single:
            a = int(rng.integers(len(classes)))
            img = texture(classes[a], size, size, rng)
            cap = rng.choice(_CAPTION_TEMPLATES_1).format(classes[a])
        else:
            a, b = (int(v) for v in rng.choice(len(classes), 2, replace=False))
            theta = rng.uniform(0, 2 * np.pi)
            off = rng.uniform(-0.2, 0.2) * size
            side = ((xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)) < off
            img = np.where(side[None], texture(classes[a], size, size, rng), texture(classes[b], size, size, rng))
            cap = rng.choice(_CAPTION_TEMPLATES_2).format(classes[a], classes[b])
        name = f"chip_{i:05d}.tif"
        write_geotiff(out / name, to_uint8(img))
        rows.append((name, cap))
    with open(out / "captions.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "caption"])
        wr.writerows(rows)
    return out / "captions.csv"
