"""Raster sources on torchgeo: GeoTIFF / COG folders (any band count, several files and CRSs).

`RasterSource` wraps a torchgeo `RasterDataset` (which indexes the files, reprojects to one CRS and
resolution on the fly and merges tiles) and draws random chips of a fixed size in pixels.

Chips are addressed by an integer index: chip `i` is drawn from a generator seeded with
`(seed, i)`. torchgeo's `RandomGeoSampler` is an iterator with hidden state; indexing by `i` instead
makes the data position of a run one integer, so a resumed run sees exactly the chips it would have
seen (exact resume), and any number of DataLoader workers produce the same stream.

Nodata: a chip whose fraction of nodata pixels (all bands equal to the file's nodata value, or
outside the raster footprint, which torchgeo fills with 0) exceeds `nodata_max_fraction` is skipped
and counted, and another chip is drawn with the next sub-seed; chips are never fed as unmarked
zeros. Values are divided by `scale` and clipped to [0, 1].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from geodino.data.bands import select_bands
from geodino.errors import DataError

log = logging.getLogger("geodino")


def _band_names_of(path: Path) -> tuple[list[str], float | None]:
    import rasterio

    try:
        with rasterio.open(path) as src:
            names = [d if d else f"band_{i + 1}" for i, d in enumerate(src.descriptions)]
            return names, src.nodata
    except Exception as e:
        raise DataError(f"cannot open raster {path}: {e}") from e


def find_rasters(paths: Sequence[str | Path], filename_glob: str = "*.tif") -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(x for x in p.rglob(filename_glob) if x.is_file()))
        else:
            raise DataError(f"data path {p} does not exist")
    if not files:
        raise DataError(f"no raster matching '{filename_glob}' under {', '.join(map(str, paths))}")
    return files


class RasterSource(torch.utils.data.Dataset):
    """Random fixed-size chips from a folder of GeoTIFFs, addressed by index (see module doc).

    Returns float32 tensors (C, chip_size, chip_size) in [0, 1] with bands in `self.band_names` order.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        chip_size: int = 256,
        bands: Sequence[str] | None = None,
        filename_glob: str = "*.tif",
        scale: float = 10000.0,
        crs=None,
        res: float | None = None,
        nodata_max_fraction: float = 0.5,
        length: int = 10000,
        seed: int = 0,
        max_redraws: int = 20,
    ):
        from torchgeo.datasets import RasterDataset

        self.files = find_rasters(paths, filename_glob)
        names, nodata = _band_names_of(self.files[0])
        for f in self.files[1:]:
            other, _ = _band_names_of(f)
            if other != names:
                raise DataError(
                    f"raster {f} has bands {other}, but {self.files[0]} has {names}; "
                    "a source needs one band layout (split it into several sources)"
                )
        self.all_band_names = names
        idx = select_bands(names, list(bands) if bands is not None else None, where=str(self.files[0]))
        self.band_names = [names[i] for i in idx]
        self.nodata = 0.0 if nodata is None else float(nodata)
        self.chip_size = int(chip_size)
        self.scale = float(scale)
        self.nodata_max_fraction = float(nodata_max_fraction)
        self.length = int(length)
        self.seed = int(seed)
        self.max_redraws = int(max_redraws)
        self.skipped_nodata = 0

        glob = filename_glob
        cls = type(
            "GeodinoGeoTiffs",
            (RasterDataset,),
            {"filename_glob": glob, "all_bands": tuple(names), "is_image": True, "separate_files": False},
        )
        root = [str(f) for f in self.files]
        self.dataset = cls(paths=root, crs=crs, res=res, bands=self.band_names)
        # Weight files by area, as RandomGeoSampler does, so big scenes are drawn more often.
        self._areas = []
        self._bounds = []
        for geom in self.dataset.index.geometry:
            xmin, ymin, xmax, ymax = geom.bounds
            self._bounds.append((xmin, ymin, xmax, ymax))
            self._areas.append(max(xmax - xmin, 0) * max(ymax - ymin, 0))
        self.res = self.dataset.res
        size_m = (self.chip_size * self.res[1], self.chip_size * self.res[0])
        ok = [i for i, (x0, y0, x1, y1) in enumerate(self._bounds) if x1 - x0 >= size_m[1] and y1 - y0 >= size_m[0]]
        if not ok:
            raise DataError(
                f"chip_size {self.chip_size} px ({size_m[1]:.0f} m) is larger than every raster "
                f"under {paths} at {self.res[0]:g} m resolution"
            )
        self._usable = ok
        w = np.array([self._areas[i] for i in ok], dtype=np.float64)
        self._probs = torch.as_tensor(w / w.sum())
        self._size_m = size_m

    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    @property
    def crs(self):
        return self.dataset.crs

    def __len__(self) -> int:
        return self.length

    def _draw(self, sub_seed: int) -> tuple[torch.Tensor, float]:
        from torchgeo.samplers.utils import get_random_bounding_box

        g = torch.Generator().manual_seed(sub_seed)
        k = self._usable[int(torch.multinomial(self._probs, 1, generator=g))]
        xs, ys = get_random_bounding_box(self._bounds[k], self._size_m, self.res, generator=g)
        sample = self.dataset[xs.start : xs.stop : self.res[0], ys.start : ys.stop : self.res[1]]
        img = sample["image"].float()
        # torchgeo rounds the window to whole pixels; trim/pad by at most one pixel to the chip size.
        img = img[:, : self.chip_size, : self.chip_size]
        if img.shape[-1] < self.chip_size or img.shape[-2] < self.chip_size:
            pad = (0, self.chip_size - img.shape[-1], 0, self.chip_size - img.shape[-2])
            img = torch.nn.functional.pad(img, pad, value=self.nodata)
        nodata_frac = float((img == self.nodata).all(dim=0).float().mean())
        return img, nodata_frac

    def chip(self, index: int) -> torch.Tensor:
        """The raw chip (digital numbers) for `index`, after nodata redraws."""
        for attempt in range(self.max_redraws):
            sub_seed = (self.seed * 1_000_003 + int(index)) * 64 + attempt
            img, frac = self._draw(sub_seed)
            if frac <= self.nodata_max_fraction:
                return img
            self.skipped_nodata += 1
            log.debug("chip %d draw %d skipped: %.0f%% nodata", index, attempt, 100 * frac)
        raise DataError(
            f"{self.max_redraws} consecutive chips were more than {self.nodata_max_fraction:.0%} nodata "
            f"in {', '.join(str(f) for f in self.files[:3])}{'...' if len(self.files) > 3 else ''}; "
            "check the rasters' nodata value or lower data.nodata_max_fraction"
        )

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self.chip(index)
        return (img / self.scale).clamp_(0.0, 1.0)


def band_statistics(source: torch.utils.data.Dataset, n: int = 64, progress: bool = False) -> tuple[list[float], list[float]]:
    """Per-band mean and std over `n` chips (values as the source returns them, i.e. in [0, 1])."""
    from tqdm.auto import tqdm

    n = min(n, len(source))
    s = s2 = None
    count = 0
    for i in tqdm(range(n), desc="band statistics", disable=not progress):
        x = source[i].double().flatten(1)
        s = x.sum(1) if s is None else s + x.sum(1)
        s2 = (x * x).sum(1) if s2 is None else s2 + (x * x).sum(1)
        count += x.shape[1]
    mean = s / count
    var = (s2 / count - mean * mean).clamp_min(1e-12)
    return [float(v) for v in mean], [float(math.sqrt(v)) for v in var]
