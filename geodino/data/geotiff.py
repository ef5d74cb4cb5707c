"""Reading rasters: the one place that knows band names, nodata, default scaling and valid pixels of a GeoTIFF.

- `band_names(src)`: the band descriptions of an open rasterio dataset, ``band_<i>`` where a band has none;
- `raster_bands(path)`: (names, nodata) of a file, with a `DataError` naming the file when it cannot be opened;
- `default_scale(dtype)`: the divisor that brings raw values to [0, 1] when the data do not say (255 for 8-bit
  rasters, 10000 for Sentinel-2 / Landsat digital numbers otherwise);
- `valid_mask(arr, nodata)`: pixels that are not nodata in every band and not NaN;
- `pick_bands(names, wanted, count, where)`: which file bands to read for a model's band list (by name when the
  descriptions hold them, else all bands in file order when the count matches);
- `read_scaled(path, ...)`: a whole raster (or its named bands) scaled to [0, 1] with its valid mask and georeference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio

from geodino.errors import DataError

RASTER_SUFFIXES = {".tif", ".tiff", ".jp2", ".vrt", ".img"}


def band_names(src) -> list[str]:
    """Band descriptions of an open rasterio dataset; ``band_<i>`` (1-based) where a band has none."""
    return [d if d else f"band_{i + 1}" for i, d in enumerate(src.descriptions)]


def raster_bands(path: str | Path) -> tuple[list[str], float | None]:
    """(band names, nodata value) of a raster file."""

    try:
        with rasterio.open(path) as src:
            return band_names(src), src.nodata
    except Exception as e:
        raise DataError(f"cannot open raster {path}: {e}") from e


def default_scale(dtype) -> float:
    """255 for 8-bit rasters, 10000 (Sentinel-2 / Landsat digital numbers) otherwise."""
    return 255.0 if np.dtype(dtype) == np.uint8 else 10000.0


def has_nodata_value(nodata) -> bool:
    return nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata))


def valid_mask(arr: np.ndarray, nodata) -> np.ndarray:
    """(C, h, w) -> (h, w) bool: pixels that are not nodata in every band (and not NaN in any)."""
    valid = np.ones(arr.shape[1:], bool)
    if np.issubdtype(arr.dtype, np.floating):
        valid &= ~np.isnan(arr).any(0)
    if has_nodata_value(nodata):
        valid &= ~(arr == nodata).all(0)
    return valid


def pick_bands(names: Sequence[str], wanted: Sequence[str], count: int, where: str) -> list[int]:
    """0-based file bands to read for `wanted` (a model's bands): by name when every one is described in the
    file, else all bands in file order when there are as many; otherwise a `DataError` naming both lists."""
    names, wanted = list(names), list(wanted)
    if all(b in names for b in wanted) and len(set(wanted)) == len(wanted):
        return [names.index(b) for b in wanted]
    if count == len(wanted):
        return list(range(count))
    raise DataError(f"raster {where} ({', '.join(names)}) has {count} band{'s' if count != 1 else ''}; this model "
                    f"takes {len(wanted)} ({', '.join(wanted)})")


def read_scaled(path: str | Path, wanted: Sequence[str] | None = None, scale: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """((C, H, W) float32 in [0, 1] with 0 at invalid pixels, (H, W) valid mask, info) of a raster file.

    `wanted` picks bands as `pick_bands`; `scale` None uses `default_scale` of the file's data type. ``info`` holds
    the path, band names read, nodata, CRS, transform and the scale used."""

    path = Path(str(path)).expanduser()
    try:
        with rasterio.open(path) as src:
            names = band_names(src)
            idx = list(range(src.count)) if wanted is None else pick_bands(names, wanted, src.count, str(path))
            arr = src.read([i + 1 for i in idx])
            info = {"path": str(path), "bands": [names[i] for i in idx], "nodata": src.nodata, "crs": src.crs,
                    "transform": src.transform}
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read raster {path}: {e}") from e
    valid = valid_mask(arr, info["nodata"])
    s = float(scale) if scale is not None else default_scale(arr.dtype)
    x = np.clip(np.nan_to_num(arr.astype(np.float32)) / s, 0.0, 1.0)
    x[:, ~valid] = 0.0
    info["scale"] = s
    return x, valid, info
