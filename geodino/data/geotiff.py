"""Reading rasters: the one place that knows band names, nodata, scaling and valid pixels of a GeoTIFF.

- `band_names(src)`: the band descriptions of an open rasterio dataset, ``band_<i>`` where a band has none;
- `raster_meta(path)` / `raster_bands(path)`: (names, nodata, data type, metadata tags) of a file, with a
  `DataError` naming the file when it cannot be opened;
- `Scaling` and `resolve_scaling(path, dtype, tags, scale, offset)`: how a file's digital numbers (DN) become
  reflectance in [0, 1], ``clip((DN + offset) / scale, 0, 1)`` (the rules are below);
- `scaling_problem(values, ...)`: a warning text when scaled values look implausible (divided twice, or clipped);
- `valid_mask(arr, nodata)`: pixels that are not nodata in every band and not NaN in any (NaN is always nodata);
- `pick_bands(names, wanted, count, where)`: which file bands to read for a model's band list (by name, also across
  spellings of the same band such as ``B04`` / ``R``; in file order only when either list names no bands; else an
  error naming the file and both lists);
- `read_scaled(path, ...)`: a whole raster (or its named bands) scaled to [0, 1] with its valid mask and georeference.

Scaling rules (`data.scale` / `data.offset` null; a number given in the config always wins):

| data | scale | offset (DN) | reflectance |
|---|---|---|---|
| uint8 / int8 | 255 | 0 | DN / 255 |
| other integers (uint16, int16, uint32, ...): Sentinel-2 / Landsat-style DN | 10000 | 0 | DN / 10000 |
| floats (already reflectance) | 1 | 0 | value |
| Sentinel-2 L1C / L2A, processing baseline >= 04.00 (25 January 2022) | 10000 | -1000 | (DN - 1000) / 10000 |
| Landsat Collection 2 Level-2 (``L2SP`` / ``L2SR``; SR bands) | 1 / 2.75e-5 | -0.2 / 2.75e-5 | 2.75e-5 DN - 0.2 |
| Landsat Collection 2 Level-1 (``L1TP`` / ``L1GT`` / ``L1GS``; OLI bands) | 1 / 2e-5 | -0.1 / 2e-5 | 2e-5 DN - 0.1 |

The Sentinel-2 offset is found, in this order, in the file's metadata tags (``BOA_ADD_OFFSET*`` /
``RADIO_ADD_OFFSET*``: the value; ``PROCESSING_BASELINE``: -1000 from 04.00), in the product's ``MTD_MSIL2A.xml`` /
``MTD_MSIL1C.xml`` of an enclosing ``.SAFE`` folder (the same keys), or in a product name anywhere in the path
(``S2B_MSIL2A_20220105T103421_N0400_...``: baseline 04.00). Landsat rules follow the Collection 2 file name
(``LC08_L2SP_...``); they are the USGS constants for the reflective bands (thermal bands are not reflectance and get
the same pair: select them only knowingly). A file that says nothing gets offset 0 (or the caller's fallback).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio

from geodino.data.bands import is_generic, match_bands
from geodino.errors import DataError

log = logging.getLogger("geodino")

RASTER_SUFFIXES = {".tif", ".tiff", ".jp2", ".vrt", ".img"}

DEFAULT_SCALE_RULE = "255 for 8-bit data, 10000 for other integer digital numbers, 1 for floats (already reflectance)"
S2_BASELINE_OFFSET = -1000.0  # BOA_ADD_OFFSET (L2A) / RADIO_ADD_OFFSET (L1C) from processing baseline 04.00
LANDSAT_C2 = {"L2": (1 / 2.75e-5, -0.2 / 2.75e-5, "Landsat Collection 2 Level-2 SR: 2.75e-5 DN - 0.2"),
              "L1": (1 / 2.0e-5, -0.1 / 2.0e-5, "Landsat Collection 2 Level-1 TOA: 2e-5 DN - 0.1")}

_S2_PRODUCT = re.compile(r"S2[A-D]_MSI(?:L1C|L2A)_\d{8}T\d{6}_N(\d{4})_")
_LANDSAT_PRODUCT = re.compile(r"^L[COTEM]0\d_(L1TP|L1GT|L1GS|L2SP|L2SR)_\d{6}_\d{8}_\d{8}_\d{2}_[A-Z0-9]{2}_",
                              re.IGNORECASE)
_OFFSET_KEYS = ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET")


def band_names(src) -> list[str]:
    """Band descriptions of an open rasterio dataset; ``band_<i>`` (1-based) where a band has none."""
    return [d if d else f"band_{i + 1}" for i, d in enumerate(src.descriptions)]


def dataset_tags(src, indexes: Sequence[int] | None = None) -> dict[str, str]:
    """The metadata tags of an open dataset and of its bands `indexes` (1-based; default all), in one mapping."""
    tags = dict(src.tags())
    for i in (indexes if indexes is not None else range(1, src.count + 1)):
        tags.update(src.tags(i))
    return tags


@dataclass(frozen=True)
class RasterMeta:
    names: list[str]
    nodata: float | None
    dtype: str
    tags: dict


def raster_meta(path: str | Path) -> RasterMeta:
    """Band names, nodata value, data type and metadata tags of a raster file."""
    try:
        with rasterio.open(path) as src:
            return RasterMeta(band_names(src), src.nodata, src.dtypes[0], dataset_tags(src))
    except Exception as e:
        raise DataError(f"cannot open raster {path}: {e}") from e


def raster_bands(path: str | Path) -> tuple[list[str], float | None]:
    """(band names, nodata value) of a raster file."""
    meta = raster_meta(path)
    return meta.names, meta.nodata


# ------------------------------------------------------------------------------------------------
# Scaling: digital numbers -> reflectance in [0, 1]
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scaling:
    """``clip((DN + offset) / scale, 0, 1)``; `why` says where the numbers come from."""

    scale: float
    offset: float = 0.0
    why: str = ""

    def unclipped(self, x):
        """(DN + offset) / scale (numpy arrays and torch tensors alike)."""
        return (x + self.offset) / self.scale if self.offset else x / self.scale

    def apply(self, x):
        return self.unclipped(x).clip(0.0, 1.0)

    def apply_(self, x):
        """`apply` in place on a float torch tensor the caller owns (no copies: the chip store's hot path)."""
        if self.offset:
            x.add_(self.offset)
        return x.div_(self.scale).clamp_(0.0, 1.0)

    def describe(self) -> str:
        dn = f"(DN {'+' if self.offset >= 0 else '-'} {abs(self.offset):g})" if self.offset else "DN"
        return f"{dn} / {self.scale:g}" + (f" ({self.why})" if self.why else "")


def default_scale(dtype) -> float:
    """The divisor for data that say nothing else (`DEFAULT_SCALE_RULE`)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.floating):
        return 1.0
    return 255.0 if dt.itemsize == 1 else 10000.0


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def check_scale(scale, what: str = "data.scale") -> float | None:
    """`scale` as a float, None kept; anything but a positive finite number is a `DataError`."""
    if scale is None:
        return None
    s = _float(scale)
    if not math.isfinite(s) or s <= 0:
        raise DataError(f"{what}={scale} must be a positive number (DN / {what.split('.')[-1]} -> [0, 1]), or null "
                        f"for the default: {DEFAULT_SCALE_RULE}")
    return s


def check_offset(offset, what: str = "data.offset") -> float | None:
    """`offset` as a float, None kept; anything but a finite number is a `DataError`."""
    if offset is None:
        return None
    o = _float(offset)
    if not math.isfinite(o):
        raise DataError(f"{what}={offset} must be a number of digital numbers added before scaling, or null "
                        "to detect it from the product (Sentinel-2 baseline >= 04.00: -1000)")
    return o


def _number(value) -> float | None:
    try:
        v = float(str(value).strip().split()[0].strip(","))
    except (ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


def _s2_offset_from(entries: dict[str, str], where: str) -> tuple[float, str] | None:
    """Offset from BOA_ADD_OFFSET* / RADIO_ADD_OFFSET* (the value) or PROCESSING_BASELINE (-1000 from 04.00)."""
    for key, value in entries.items():
        if key.upper().startswith(_OFFSET_KEYS) and _number(value) is not None:
            return _number(value), f"{key.upper()} in {where}"
    for key, value in entries.items():
        if key.upper() == "PROCESSING_BASELINE" and _number(value) is not None:
            baseline = _number(value)
            return (S2_BASELINE_OFFSET if baseline >= 4.0 else 0.0), f"processing baseline {value} in {where}"
    return None


@lru_cache(maxsize=256)
def _safe_metadata(folder: str) -> tuple[str, dict[str, str]] | None:
    """(file name, offset keys) of the product metadata (MTD_MSIL2A.xml / MTD_MSIL1C.xml) in `folder`, or None."""
    for name in ("MTD_MSIL2A.xml", "MTD_MSIL1C.xml"):
        p = Path(folder) / name
        if p.is_file():
            text = p.read_text(errors="replace")
            return name, dict(re.findall(r"<(BOA_ADD_OFFSET|RADIO_ADD_OFFSET|PROCESSING_BASELINE)\b[^>]*>\s*([^<\s]+)",
                                         text))
    return None


def detect_offset(path: str | Path, tags: dict | None = None) -> tuple[float, str] | None:
    """(offset in DN, where it was found) from a file's tags, its Sentinel-2 product metadata or its product name
    (module docstring), or None when nothing says."""
    path = Path(str(path))
    found = _s2_offset_from(dict(tags or {}), f"the tags of {path.name}")
    if found is not None:
        return found
    for folder in list(path.parents)[:6]:
        meta = _safe_metadata(str(folder))
        if meta is not None:
            found = _s2_offset_from(meta[1], f"{folder.name}/{meta[0]}")
            if found is not None:
                return found
            break
    m = _S2_PRODUCT.search(str(path))
    if m:
        return ((S2_BASELINE_OFFSET if int(m.group(1)) >= 400 else 0.0),
                f"processing baseline {int(m.group(1)) / 100:05.2f} in the product name (N{m.group(1)})")
    level = landsat_level(path.name)
    if level:
        return LANDSAT_C2[level][1], LANDSAT_C2[level][2]
    return None


def landsat_level(name: str) -> str | None:
    """'L1' or 'L2' for a Landsat Collection 2 file name (``LC08_L2SP_...``), else None."""
    m = _LANDSAT_PRODUCT.match(name)
    return None if m is None else m.group(1).upper()[:2]


def resolve_scaling(path: str | Path, dtype, tags: dict | None = None, scale: float | None = None,
                    offset: float | None = None, fallback_offset: float = 0.0) -> Scaling:
    """How `path`'s DN become reflectance: `scale` / `offset` when given, else the rules of the module docstring
    (offset `fallback_offset` when nothing says)."""
    scale, offset = check_scale(scale), check_offset(offset)
    why = []
    level = landsat_level(Path(str(path)).name)
    if scale is not None:
        why.append("data.scale")
    elif level:
        scale = LANDSAT_C2[level][0]
        why.append(LANDSAT_C2[level][2])
    else:
        scale = default_scale(dtype)
        why.append(f"{np.dtype(dtype).name} default")
    if offset is not None:
        why.append("data.offset")
    else:
        offset, source = detect_offset(path, tags) or (float(fallback_offset), None)
        if source and source not in why:
            why.append(source)
    return Scaling(float(scale), float(offset), "; ".join(why))


def scaling_problem(values: np.ndarray, scaling: Scaling, bands: Sequence[str], where: str) -> str | None:
    """A warning when scaled values look wrong, else None. `values`: (C, N) valid pixels after `scaling`, before
    clipping. Wrong: more than 99 % of all values below 1e-3 (divided twice: the data were already reflectance) or
    more than 5 % of one band's values above 1 (clipped: the scale is too small)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    dark = float((values < 1e-3).mean())
    clipped = (values > 1.0).mean(1)
    worst = int(np.argmax(clipped))
    if dark > 0.99:
        what = f"{100 * dark:.1f}% of the sampled pixels are below 0.001 (the data look divided twice)"
    elif clipped[worst] > 0.05:
        what = f"{100 * clipped[worst]:.1f}% of band {bands[worst]}'s pixels exceed 1 and are clipped"
    else:
        return None
    high = float(np.percentile(scaling.scale * values - scaling.offset, 95))  # raw values, all bands
    suggest = next((s for s in (1, 255, 10000, 65535) if high <= s), 10 ** math.ceil(math.log10(max(high, 1.0))))
    return (f"implausible scaling of {where}: {what} after {scaling.describe()}, bands "
            f"{', '.join(bands)}; 95% of the raw values are below {high:.4g}: set data.scale={suggest:g}"
            f" (and data.offset=0 if no offset applies)")


# ------------------------------------------------------------------------------------------------
# Valid pixels, band picking, whole-raster reading
# ------------------------------------------------------------------------------------------------

def has_nodata_value(nodata) -> bool:
    return nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata))


def valid_mask(arr: np.ndarray, nodata) -> np.ndarray:
    """(C, h, w) -> (h, w) bool: pixels that are not nodata in every band (and not NaN in any: NaN is always
    nodata, whatever the file declares)."""
    valid = np.ones(arr.shape[1:], bool)
    if np.issubdtype(arr.dtype, np.floating):
        valid &= ~np.isnan(arr).any(0)
    if has_nodata_value(nodata):
        valid &= ~(arr == nodata).all(0)
    return valid


def pick_bands(names: Sequence[str], wanted: Sequence[str], count: int, where: str) -> list[int]:
    """0-based file bands to read for `wanted` (a model's bands, in its order): by name (`bands.match_bands`: exact,
    else the same visible / NIR band under another name), else -- only when the file's or the model's names are
    placeholders (``band_1`` ...) and the counts agree -- all bands in file order; otherwise a `DataError` naming
    the file and both band lists. The one mapping of training (``stage=text`` captions), segmentation and eval."""
    names, wanted = list(names), list(wanted)
    idx = match_bands(names, wanted)
    if idx is not None:
        return idx
    if count == len(wanted) and (is_generic(names) or is_generic(wanted)):
        return list(range(count))
    raise DataError(f"raster {where} ({', '.join(names)}) has {count} band{'s' if count != 1 else ''}; this model "
                    f"takes {len(wanted)} ({', '.join(wanted)}) and they cannot be matched by name (set the file's "
                    "band descriptions to the bands it holds)")


def read_scaled(path: str | Path, wanted: Sequence[str] | None = None, scale: float | None = None,
                offset: float | None = None, fallback_offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """((C, H, W) float32 in [0, 1] with 0 at invalid pixels, (H, W) valid mask, info) of a raster file.

    `wanted` picks bands as `pick_bands`; `scale` / `offset` None follow `resolve_scaling` (the data type's default,
    the product's offset, else `fallback_offset`). ``info`` holds the path, band names read, nodata, CRS,
    transform, the scale and offset used and, when the values look implausibly scaled, the ``warning`` logged."""

    path = Path(str(path)).expanduser()
    try:
        with rasterio.open(path) as src:
            names = band_names(src)
            idx = list(range(src.count)) if wanted is None else pick_bands(names, wanted, src.count, str(path))
            arr = src.read([i + 1 for i in idx])
            info = {"path": str(path), "bands": [names[i] for i in idx], "nodata": src.nodata, "crs": src.crs,
                    "transform": src.transform}
            tags = dataset_tags(src, [i + 1 for i in idx])
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read raster {path}: {e}") from e
    valid = valid_mask(arr, info["nodata"])
    scaling = resolve_scaling(path, arr.dtype, tags, scale, offset, fallback_offset)
    raw = arr.astype(np.float32)
    problem = scaling_problem(scaling.unclipped(raw[:, valid][:, ::max(1, int(valid.sum()) // 65536)]), scaling,
                              info["bands"], str(path))
    x = np.nan_to_num(scaling.apply(raw), nan=0.0)
    x[:, ~valid] = 0.0
    info.update(scale=scaling.scale, offset=scaling.offset, scaling=scaling.describe())
    if problem:
        log.warning(problem)
        info["warning"] = problem
    return x, valid, info


def crs_string(crs) -> str | None:
    """A CRS as text: ``EPSG:<code>`` where it has one, else its WKT (None stays None)."""
    if crs is None:
        return None
    return crs.to_string() if hasattr(crs, "to_string") else str(crs)
