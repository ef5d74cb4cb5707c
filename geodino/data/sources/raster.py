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

Named sensors: `sensor=sentinel2|landsat8|landsat9|naip` reads the files with torchgeo's own
`Sentinel2`, `Landsat8`, `Landsat9` or `NAIP` dataset class (their filename globs and regexes, one file
per band for Sentinel-2 and Landsat, band names from the sensor) instead of the generic GeoTIFF class.
The files must follow the product naming (e.g. `T31UFQ_20200101T103421_B02.jp2`,
`LC08_L2SP_199026_20200101_20200110_02_T1_SR_B4.TIF`, `m_3807511_ne_18_060_20181104.tif`); when no
file under the paths does, the folder is read as generic multi-band GeoTIFFs with band descriptions
(the sensor then only names the RGB bands), so a stacked Sentinel-2 GeoTIFF keeps working.

Chip lists: `chip_indices` restricts the source to a list of chip indices (as written by
`geodino curate action=balance|retrieve`, format in geodino.data.lists); item `i` is then chip
`chip_indices[i % len(chip_indices)]`.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import torch
import torchgeo.datasets as tgd
from torchgeo.datasets import RasterDataset
from torchgeo.samplers.utils import get_random_bounding_box

from geodino.data.bands import select_bands, sensor_bands
from geodino.data.geotiff import RASTER_SUFFIXES, raster_bands
from geodino.errors import DataError

log = logging.getLogger("geodino")


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


# torchgeo dataset class per named sensor, and the bands read when `bands` is not given.
SENSOR_DATASETS = {"sentinel2": "Sentinel2", "landsat8": "Landsat8", "landsat9": "Landsat9", "naip": "NAIP"}


def sensor_dataset_class(sensor: str):
    """torchgeo's RasterDataset subclass for a named sensor."""

    try:
        return getattr(tgd, SENSOR_DATASETS[sensor.lower()])
    except KeyError:
        raise DataError(f"unknown sensor '{sensor}' for a raster source; choose one of: "
                        f"{', '.join(SENSOR_DATASETS)} (or null for generic GeoTIFFs)") from None


def _sensor_band_names(sensor: str, cls) -> list[str]:
    if cls.all_bands:
        return list(cls.all_bands)
    return [b.name for b in sensor_bands(sensor)]  # Landsat: torchgeo has no all_bands


def find_sensor_scenes(paths: Sequence[str | Path], sensor: str) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Files under `paths` named like `sensor`'s products, grouped by scene.

    Returns ({scene key: {band: file}}, the sensor's band names in canonical order). For one-file
    sensors (NAIP) each file is a scene holding every band (key '*').
    """

    cls = sensor_dataset_class(sensor)
    names = _sensor_band_names(sensor, cls)
    regex = cls.filename_regex
    if "{}" in regex:  # Sentinel2 formats the resolution suffix in (the first band's); any here
        regex = regex.format(r"\d+m")
    pattern = re.compile(regex, re.VERBOSE)
    glob = cls.filename_glob.replace("{}", "*")
    candidates: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_file():
            candidates.append(p)
        elif p.is_dir():
            candidates.extend(sorted(x for x in p.rglob("*") if x.is_file()))
        else:
            raise DataError(f"data path {p} does not exist")
    scenes: dict[str, dict[str, Path]] = {}
    for f in candidates:
        if f.suffix.lower() not in RASTER_SUFFIXES or not fnmatch.fnmatch(f.name, glob):
            continue
        m = pattern.match(f.name)
        if m is None:
            continue
        if cls.separate_files and "band" in m.groupdict():
            key = str(f.parent / (f.name[: m.start("band")] + "{band}" + f.name[m.end("band"):]))
            scenes.setdefault(key, {})[m.group("band")] = f
        else:
            scenes[str(f)] = {"*": f}
    return scenes, names


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
        sensor: str | None = None,
        chip_indices: Sequence[int] | None = None,
    ):
        self.sensor = None
        if sensor and str(sensor).lower() in SENSOR_DATASETS:
            scenes, sensor_names = find_sensor_scenes(paths, str(sensor))
            if scenes:
                self.sensor = str(sensor).lower()
            else:
                log.info("sensor=%s: no file under %s follows the %s naming; reading generic GeoTIFFs",
                         sensor, ", ".join(map(str, paths)), SENSOR_DATASETS[str(sensor).lower()])
        self.chip_indices = None if chip_indices is None else np.asarray(chip_indices, dtype=np.int64)
        if self.chip_indices is not None and self.chip_indices.size == 0:
            raise DataError("the chip list is empty")
        self.nodata = 0.0
        self.chip_size = int(chip_size)
        self.scale = float(scale)
        self.nodata_max_fraction = float(nodata_max_fraction)
        self.length = int(length)
        self.seed = int(seed)
        self.max_redraws = int(max_redraws)
        self.skipped_nodata = 0
        if self.sensor is not None:
            self._init_sensor(scenes, sensor_names, bands, crs, res)
        else:
            self._init_generic(paths, bands, filename_glob, crs, res, RasterDataset)
        self._init_bounds(paths)

    def _init_sensor(self, scenes, names, bands, crs, res) -> None:
        cls = sensor_dataset_class(self.sensor)
        keys = sorted(scenes)
        if cls.separate_files:
            if bands is None:  # every band of the sensor present in every scene, in sensor order
                bands = [b for b in names if all(b in scenes[k] for k in keys)]
                if not bands:
                    raise DataError(f"no {cls.__name__} band is present in every scene under {keys[0]}")
            if cls.all_bands:  # a misspelt band name is named as such, not as a missing file
                select_bands(cls.all_bands, list(bands), where=f"{cls.__name__} band names")
            for k in keys:
                missing = [b for b in bands if b not in scenes[k]]
                if missing:
                    have = ", ".join(sorted(scenes[k]))
                    raise DataError(f"band{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found for "
                                    f"{cls.__name__} scene {k.replace('{band}', missing[0])} (file missing; "
                                    f"bands on disk: {have})")
            self.files = [scenes[k][bands[0]] for k in keys]
            self.band_names = list(bands)
        else:
            self.files = [scenes[k]["*"] for k in keys]
            idx = select_bands(names, list(bands) if bands is not None else None, where=str(self.files[0]))
            self.band_names = [names[i] for i in idx]
            for f in self.files:
                with rasterio.open(f) as src:
                    if src.count < max(idx) + 1:
                        raise DataError(f"band {names[max(idx)]} not found in {f}: it has {src.count} bands, "
                                        f"{cls.__name__} expects {', '.join(names)}")
        _, nodata = raster_bands(self.files[0])
        self.nodata = 0.0 if nodata is None else float(nodata)
        kw = {"crs": crs, "bands": self.band_names}
        if res is not None:
            kw["res"] = res
        self.dataset = cls(paths=[str(f) for f in self.files], **kw)

    def _init_generic(self, paths, bands, filename_glob, crs, res, RasterDataset) -> None:
        self.files = find_rasters(paths, filename_glob)
        names, nodata = raster_bands(self.files[0])
        for f in self.files[1:]:
            other, _ = raster_bands(f)
            if other != names:
                raise DataError(
                    f"raster {f} has bands {other}, but {self.files[0]} has {names}; "
                    "a source needs one band layout (split it into several sources)"
                )
        idx = select_bands(names, list(bands) if bands is not None else None, where=str(self.files[0]))
        self.band_names = [names[i] for i in idx]
        self.nodata = 0.0 if nodata is None else float(nodata)

        glob = filename_glob
        cls = type(
            "GeodinoGeoTiffs",
            (RasterDataset,),
            {"filename_glob": glob, "all_bands": tuple(names), "is_image": True, "separate_files": False},
        )
        root = [str(f) for f in self.files]
        self.dataset = cls(paths=root, crs=crs, res=res, bands=self.band_names)

    def _init_bounds(self, paths) -> None:
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

    def chip_index(self, index: int) -> int:
        """The chip index item `index` reads: itself, or its entry in the chip list."""
        if self.chip_indices is None:
            return int(index)
        return int(self.chip_indices[int(index) % len(self.chip_indices)])

    def valid_mask(self, img: torch.Tensor) -> torch.Tensor:
        """(H, W) True where a raw chip holds data (not every band equal to nodata)."""
        return ~(img == self.nodata).all(dim=0)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self.chip(self.chip_index(index))
        return (img / self.scale).clamp_(0.0, 1.0)

    def preview(self, size: int = 160, multiple: int = 16, seed: int = 12345) -> torch.Tensor:
        """One larger chip (C, S, S) in [0, 1], S <= `size` a multiple of `multiple` that fits every raster, for
        figures (e.g. the PCA feature map written at the end of training)."""
        side = min(size, *(int((b[2] - b[0]) / self.res[0]) for b in self._bounds),
                   *(int((b[3] - b[1]) / self.res[1]) for b in self._bounds))
        side -= side % multiple
        view = RasterSource([str(f) for f in self.files], chip_size=side, bands=self.band_names, scale=self.scale,
                            nodata_max_fraction=self.nodata_max_fraction, length=1, seed=seed, sensor=self.sensor)
        return view[0]

    def item_with_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item `index` in [0, 1], (H, W) mask of pixels holding data) (see geodino.data.stats)."""
        raw = self.chip(self.chip_index(index))
        return (raw / self.scale).clamp_(0.0, 1.0), self.valid_mask(raw)
