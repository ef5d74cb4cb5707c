"""Canopy-height dataset on disk: paired RGB / canopy-height-model GeoTIFFs (docs/eo_data.md §4).

Format (``root=``; plain GeoTIFF, readable with rasterio only)::

    <root>/dataset.json          optional: {"name", "gsd_m", "bands": ["red", "green", "blue", ...],
                                 "image_scale": 255 (divide pixel values by this to reach [0, 1]),
                                 "chm_units": "m", "chm_nodata": -9999, "max_height_m": 96,
                                 "splits": {"train": "splits/train.txt", ...}}
    <root>/splits/<split>.txt    one sample stem per line (default split names: train, val, test)
    <root>/images/<stem>.tif     C-band image (RGB by default), uint8 (or any dtype with image_scale)
    <root>/chm/<stem>.tif        1 band, float32 metres above ground, nodata (file's nodata, else
                                 chm_nodata) or NaN; same CRS, transform and height x width as the image
    <root>/valid/<stem>.tif      optional 1-band mask, non-zero = pixel is scored

`CanopyTiles` serves one split as a dense tile set (geodino.eval.dense): the image's red, green and blue bands
(found in ``bands`` by `geodino.data.bands.rgb_indices`) scaled to [0, 1], heights in metres and the valid mask.
A pair whose size, CRS or transform disagree, a missing file, or an image without a red/green/blue band raises a
`DataError` naming the files. Heights below 0 become 0 (Tolan et al.) and heights above ``max_height_m`` are
clipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import torch

from geodino.data.bands import missing_rgb, rgb_indices
from geodino.errors import DataError


def read_meta(root: Path) -> dict:
    """``<root>/dataset.json`` ({} when there is none)."""
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


class CanopyTiles:
    """One split as a dense tile set (geodino.eval.dense.TileSet); `size` checks a pair before it is read."""

    def __init__(self, root: Path, split: str, meta: dict, max_height: float | None):
        self.root, self.split, self.meta, self.max_height = Path(root), split, meta, max_height
        rel = (meta.get("splits") or {}).get(split, f"splits/{split}.txt")
        self.split_file = self.root / rel
        if not self.split_file.is_file():
            raise DataError(f"split file {self.split_file} not found (expected <root>/splits/{split}.txt, one stem per line)")
        self.stems = [s.strip() for s in self.split_file.read_text().splitlines() if s.strip() and not s.startswith("#")]
        if not self.stems:
            raise DataError(f"{self.split_file}: no samples")
        self.bands = [str(b).lower() for b in meta.get("bands", ["red", "green", "blue"])]
        rgb = rgb_indices(self.bands)
        if rgb is None:
            raise DataError(f"{self.root / 'dataset.json'}: bands {self.bands} have no {missing_rgb(self.bands)[0]} band")
        self.rgb = list(rgb)
        self._checked: dict[int, tuple[int, int]] = {}

    def paths(self, i: int) -> tuple[Path, Path, Path | None]:
        stem = self.stems[i]
        img, chm = self.root / "images" / f"{stem}.tif", self.root / "chm" / f"{stem}.tif"
        valid = self.root / "valid" / f"{stem}.tif"
        for p in (img, chm):
            if not p.is_file():
                raise DataError(f"{p}: missing (sample '{stem}' listed in {self.split_file})")
        return img, chm, valid if valid.is_file() else None

    def files(self) -> list[Path]:
        out = []
        for i in range(len(self)):
            img, chm, val = self.paths(i)
            out += [img, chm] + ([val] if val else [])
        return out

    def __len__(self) -> int:
        return len(self.stems)

    def size(self, i: int) -> tuple[int, int]:
        if i in self._checked:
            return self._checked[i]
        img_p, chm_p, val_p = self.paths(i)
        try:
            with rasterio.open(img_p) as img, rasterio.open(chm_p) as chm:
                if chm.count != 1:
                    raise DataError(f"{chm_p}: canopy height model must have 1 band, has {chm.count}")
                if img.count < max(self.rgb) + 1:
                    raise DataError(f"{img_p}: {img.count} band(s) but dataset.json lists {self.bands}")
                if (img.height, img.width) != (chm.height, chm.width):
                    raise DataError(f"{img_p} is {img.height}x{img.width} but {chm_p} is {chm.height}x{chm.width}")
                if img.crs != chm.crs:
                    raise DataError(f"{img_p} has CRS {img.crs} but {chm_p} has CRS {chm.crs}")
                if not img.transform.almost_equals(chm.transform):
                    raise DataError(f"{img_p} and {chm_p} have different geotransforms ({tuple(img.transform)[:6]} vs "
                                    f"{tuple(chm.transform)[:6]})")
                hw = (img.height, img.width)
            if val_p is not None:
                with rasterio.open(val_p) as v:
                    if (v.height, v.width) != hw:
                        raise DataError(f"{val_p} is {v.height}x{v.width} but {img_p} is {hw[0]}x{hw[1]}")
        except rasterio.errors.RasterioIOError as e:
            raise DataError(f"{img_p} / {chm_p}: not readable GeoTIFFs ({e})") from None
        self._checked[i] = hw
        return hw

    def _scale(self, data: np.ndarray, path: Path) -> np.ndarray:
        scale = self.meta.get("image_scale")
        if scale is None:
            if data.dtype == np.uint8:
                scale = 255.0
            else:
                raise DataError(f"{path}: {data.dtype} image; set image_scale in dataset.json (the divisor that maps "
                                f"pixel values to [0, 1])")
        return np.clip(data.astype(np.float32) / float(scale), 0.0, 1.0)

    def load(self, i: int) -> dict:
        self.size(i)
        img_p, chm_p, val_p = self.paths(i)
        with rasterio.open(img_p) as src:
            image = self._scale(src.read(), img_p)[self.rgb]
        with rasterio.open(chm_p) as src:
            chm = src.read(1).astype(np.float32)
            nodata = src.nodata if src.nodata is not None else self.meta.get("chm_nodata")
        valid = np.isfinite(chm)
        if nodata is not None and np.isfinite(nodata):
            valid &= chm != np.float32(nodata)
        if val_p is not None:
            with rasterio.open(val_p) as src:
                valid &= src.read(1) != 0
        chm = np.where(valid, np.maximum(chm, 0.0), 0.0).astype(np.float32)
        if self.max_height:
            chm = np.minimum(chm, float(self.max_height))
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "target": torch.from_numpy(chm),
                "valid": torch.from_numpy(valid), "name": self.stems[i], "group": ""}
