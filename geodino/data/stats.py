"""Per-band normalisation statistics of a data source (the one implementation; `geodino curate action=stats`,
`data=` sources without a stats file, and caption data all use it).

Items come from ``source.item_with_mask(i) -> ((C, H, W) values in [0, 1], (H, W) valid mask)`` when the source
offers it (raster sources: nodata pixels are left out, so the fill values of partly empty chips do not bias the
mean), else ``source[i]``; NaN pixels are always left out. Per-item moments are merged with Chan's parallel formula
in float64, so no catastrophic cancellation on large pools. Statistics are never NaN: a pool without a valid pixel,
or a non-finite result, is a `DataError`, and `write_stats_file` refuses to store a non-finite value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from geodino.errors import DataError
from geodino.outputs import atomic_write_text

STATS_FORMAT = "geodino band stats v1"  # the "format" of a band_stats.json (`geodino curate action=stats`)


def band_statistics(source, n: int = 64, progress: bool = False, info: dict | None = None,
                    indices: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
    """(mean, std) per band over items `indices` (default the first `n`). `info`, when given, receives the item,
    pixel and excluded-pixel counts."""

    if indices is None:
        n = min(int(n), len(source))
        indices = range(n)
    indices = list(indices)
    if not indices:
        raise DataError("band statistics need at least one chip or image")
    masked = hasattr(source, "item_with_mask")
    count, mean, m2, excluded = 0, None, None, 0
    for i in tqdm(indices, desc="band statistics", disable=not progress):
        if masked:
            x, valid = source.item_with_mask(int(i))
        else:
            x = source[int(i)]
            x = x["image"] if isinstance(x, dict) else x
            valid = torch.ones(x.shape[1:], dtype=torch.bool)
        x = x.double()
        valid = valid & ~torch.isnan(x).any(0)
        excluded += int((~valid).sum())
        x = x[:, valid]
        nb = x.shape[1]
        if nb == 0:
            continue
        mb = x.mean(1)
        m2b = ((x - mb[:, None]) ** 2).sum(1)
        if mean is None:
            mean, m2, count = mb, m2b, nb
            continue
        delta = mb - mean
        tot = count + nb
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (count * nb / tot)
        count = tot
    if mean is None:
        raise DataError(f"the {len(indices)} items read for band statistics hold no valid (non-nodata) pixel")
    var = (m2 / count).clamp_min(1e-12)
    _check_finite(getattr(source, "band_names", None), mean, var, f"the {len(indices)} items read")
    if info is not None:
        info.update({"items": len(indices), "pixels": int(count), "nodata_pixels_excluded": int(excluded)})
    return [float(v) for v in mean], [float(math.sqrt(v)) for v in var]


def _check_finite(bands, mean, std, where: str) -> None:
    bad = [i for i, (m, s) in enumerate(zip(mean, std)) if not (math.isfinite(float(m)) and math.isfinite(float(s)))]
    if bad:
        names = [bands[i] if bands is not None and i < len(bands) else f"band {i + 1}" for i in bad]
        raise DataError(f"band statistics of {where} are not finite for {', '.join(names)} (no valid pixel, or "
                        "infinite values): check the rasters' nodata value and data.scale")


# ------------------------------------------------------------------------------------------------
# band_stats.json: written by `geodino curate action=stats`, read by data.stats_file=
# ------------------------------------------------------------------------------------------------

def write_stats_file(path: str | Path, bands: Sequence[str], mean: Sequence[float], std: Sequence[float],
                     **meta) -> Path:
    """A band statistics file: format tag, band names, mean and std (in [0, 1] units), plus how they were made,
    written atomically. A non-finite mean or std is refused (JSON would store NaN)."""
    _check_finite(list(bands), mean, std, f"{path}")
    doc = {"format": STATS_FORMAT, "bands": list(bands), "mean": [float(m) for m in mean],
           "std": [float(s) for s in std], **meta}
    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False))


def load_stats_file(path, band_names: list[str], scale: float | None = None,
                    offset: float | None = None) -> tuple[list[float], list[float]]:
    """Mean/std for `band_names` from a band_stats.json (see geodino.data.stats), matched by name; a file made with
    another `scale` / `offset` (when both sides record one) is refused."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"data.stats_file {path} does not exist (write it with `geodino curate action=stats`)")
    try:
        doc = json.loads(path.read_text())
        names, mean, std = list(doc["bands"]), list(doc["mean"]), list(doc["std"])
        if doc.get("format", STATS_FORMAT) != STATS_FORMAT:
            raise ValueError(f"format is '{doc['format']}', not '{STATS_FORMAT}'")
    except Exception as e:
        raise DataError(f"data.stats_file {path} is not a band statistics file: {e}") from e
    missing = [b for b in band_names if b not in names]
    if missing:
        raise DataError(f"band{'s' if len(missing) > 1 else ''} {', '.join(missing)} not in data.stats_file {path} "
                        f"(it has {', '.join(names)})")
    if scale is not None and doc.get("scale") is not None and float(doc["scale"]) != float(scale):
        raise DataError(f"data.stats_file {path} was computed with scale={doc['scale']:g} but data.scale={scale:g}")
    if offset is not None and doc.get("offset") is not None and float(doc["offset"]) != float(offset):
        raise DataError(f"data.stats_file {path} was computed with offset={doc['offset']:g} but the data are read "
                        f"with offset={offset:g} (data.offset)")
    return [float(mean[names.index(b)]) for b in band_names], [float(std[names.index(b)]) for b in band_names]
