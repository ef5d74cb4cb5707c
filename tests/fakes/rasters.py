"""Tiny georeferenced rasters with rasterio, in the products' own file naming where a test needs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tif(path: Path, data: np.ndarray, epsg: int, left: float, top: float, res: float, nodata=0,
              descriptions=None, tags: dict | None = None) -> Path:
    """A GeoTIFF (whatever the suffix, as the sample data's ``.jp2`` files) of (C, H, W) or (H, W) `data` at `res`
    with its top-left corner at (`left`, `top`) in EPSG:`epsg`; optional band descriptions and dataset tags."""
    import rasterio
    from rasterio.transform import from_origin

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   crs=f"EPSG:{epsg}", transform=from_origin(left, top, res, res), nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or []):
            dst.set_band_description(i + 1, d)
        if tags:
            dst.update_tags(**tags)
    return path


def const_bands(values, size=64, dtype=np.uint16) -> np.ndarray:
    return np.stack([np.full((size, size), v, dtype=dtype) for v in values])
