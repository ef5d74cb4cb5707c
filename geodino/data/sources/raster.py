"""Raster sources on torchgeo: GeoTIFF / COG folders (any band count, several files and CRSs).

`RasterSource` wraps torchgeo `RasterDataset`s (which index the files, reproject to one CRS and
resolution on the fly and merge tiles) and draws random chips of a fixed size in pixels.

Chips are addressed by an integer index: chip `i` is drawn from a generator seeded with
`(seed, i)`. torchgeo's `RandomGeoSampler` is an iterator with hidden state; indexing by `i` instead
makes the data position of a run one integer, so a resumed run sees exactly the chips it would have
seen (exact resume), and any number of DataLoader workers produce the same stream.

Nodata: a pixel is nodata when every band equals the file's nodata value (0 when the file declares none; torchgeo
fills the outside of the raster footprint with it) or when any band is NaN (whatever the file declares). A chip
whose fraction of nodata pixels exceeds `nodata_max_fraction` is skipped and counted, and another chip is drawn with
the next sub-seed. Items never contain NaN: nodata pixels are filled with `fill_nodata(values)` (set by
`build_source` to the normalisation mean, so they normalise to 0, the neutral input, instead of a dark false edge;
0 until set).

Scaling: values are ``clip((DN + offset) / scale, 0, 1)``, per file, by `geodino.data.geotiff.resolve_scaling`:
`scale` / `offset` None follow the data type and the product (Sentinel-2 processing baseline >= 04.00: offset -1000;
Landsat Collection 2 Level-1 / Level-2 scale and offset; rules in geodino.data.geotiff). Files needing different
pairs (e.g. Sentinel-2 scenes on both sides of the 04.00 baseline) are read by separate torchgeo datasets, so a chip
never mixes them. `scale` / `offset` (properties) are the pair most files use, recorded in the contract;
`check_scaling()` warns once when a few chips look implausibly scaled.

Named sensors: `sensor=sentinel2|landsat8|landsat9|naip` reads the files with torchgeo's own
`Sentinel2`, `Landsat8`, `Landsat9` or `NAIP` dataset class (their dates, band names from the sensor) instead of
the generic GeoTIFF class. One-file-per-band products are grouped into scenes here (`find_sensor_scenes`): Sentinel-2
L1C ``T31UFQ_20200101T103421_B02.jp2`` and L2A ``..._B02_10m.jp2`` (also in a ``.SAFE`` tree,
``IMG_DATA/R10m/...``; a band present at several resolutions is read at its native one), Landsat Collection 2
Level-1 ``LC08_L1TP_..._B4.TIF`` and Level-2 ``LC08_L2SP_..._SR_B4.TIF``; QA, angle and auxiliary files
(``QA_PIXEL``, ``SCL``, ``TCI``, ...) are never bands. NAIP is one 4-band file ``m_3807511_ne_18_060_20181104.tif``.
When no file follows the sensor's naming, multi-band files are read as generic GeoTIFFs with band descriptions (the
sensor then only names the RGB bands), so a stacked Sentinel-2 GeoTIFF keeps working; single-band files, or only
auxiliary files of the sensor, are refused with the expected names. Without a sensor, a folder of several
single-band files named like per-band products (``..._B4.TIF``) is refused too (set data.sensor=): it would train a
1-band model on every band and QA file alike.

Chip lists: `chip_indices` restricts the source to a list of chip indices (as written by
`geodino curate action=balance|retrieve`, format in geodino.data.lists); item `i` is then chip
`chip_indices[i % len(chip_indices)]`.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import rasterio
import torch
import torchgeo.datasets as tgd
from torchgeo.datasets import RasterDataset
from torchgeo.samplers.utils import get_random_bounding_box

from geodino.data.bands import select_bands, sensor_bands
from geodino.data.geotiff import (
    RASTER_SUFFIXES,
    Scaling,
    check_scale,
    crs_string,
    detect_offset,
    raster_meta,
    resolve_scaling,
    scaling_problem,
    valid_mask,
)
from geodino.errors import DataError

log = logging.getLogger("geodino")


def _walk(paths: Sequence[str | Path], filename_glob: str) -> list[Path]:
    """The files given, and those matching `filename_glob` under the folders given (sorted per folder)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(x for x in p.rglob(filename_glob) if x.is_file()))
        else:
            raise DataError(f"data path {p} does not exist")
    return files


def find_rasters(paths: Sequence[str | Path], filename_glob: str = "*.tif") -> list[Path]:
    files = _walk(paths, filename_glob)
    if not files:
        raise DataError(f"no raster matching '{filename_glob}' under {', '.join(map(str, paths))}")
    return files


# torchgeo dataset class per named sensor, and the file names it expects (for error messages).
SENSOR_DATASETS = {"sentinel2": "Sentinel2", "landsat8": "Landsat8", "landsat9": "Landsat9", "naip": "NAIP"}
SENSOR_NAMING = {
    "sentinel2": "T<tile>_<YYYYMMDDTHHMMSS>_B<nn>.jp2 (L1C, e.g. T31UFQ_20200101T103421_B02.jp2) or "
                 "T<tile>_<YYYYMMDDTHHMMSS>_B<nn>_<10|20|60>m.jp2 (L2A, also in a .SAFE tree IMG_DATA/R10m/...)",
    "landsat8": "LC08_L2SP_<path><row>_<date>_<processing date>_02_<T1|T2>_SR_B<n>.TIF (Collection 2 Level-2) or "
                "LC08_L1TP_<path><row>_<date>_<processing date>_02_<T1|T2>_B<n>.TIF (Level-1)",
    "landsat9": "LC09_L2SP_<path><row>_<date>_<processing date>_02_<T1|T2>_SR_B<n>.TIF (Collection 2 Level-2) or "
                "LC09_L1TP_<path><row>_<date>_<processing date>_02_<T1|T2>_B<n>.TIF (Level-1)",
    "naip": "m_<quadrangle>_<quarter>_<utm zone>_<resolution>_<YYYYMMDD>.tif (one 4-band file)",
}
# A file stem ending like one band of a per-band product: ..._B4, ..._SR_B4, ..._B8A, ..._B02_10m.
_BAND_LIKE = re.compile(r"(?:^|[_.-])(?:SR_|ST_)?B(?:\d{1,2}|8A)(?:_\d+m)?$", re.IGNORECASE)
_RESOLUTION_DIR = re.compile(r"^R\d+m$")
S2_BASELINE_04_DATE = "20220125"  # first acquisitions processed with baseline 04.00 (offset -1000)


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


def _default_bands(sensor: str, names: Sequence[str]) -> list[str]:
    """Bands read when data.bands is null: the sensor's reflective bands (thermal ones are not reflectance)."""
    wavelength = {b.name: b.wavelength_nm for b in sensor_bands(sensor)}
    return [b for b in names if (wavelength.get(b) or 0) < 8000]


def _listing(files: Sequence[Path], n: int = 5) -> str:
    names = [f.name for f in files[:n]]
    return ", ".join(names) + (f", ... ({len(files)} files)" if len(files) > n else "")


@dataclass
class SensorScan:
    """Files under the data paths named like a sensor's products: ``scenes`` {scene key: {band: file}}, the
    sensor's band names in canonical order, each scene's date, and the files that follow the naming but are no
    band (QA, angles, auxiliary products)."""

    scenes: dict[str, dict[str, Path]]
    names: list[str]
    dates: dict[str, str] = field(default_factory=dict)
    other: list[Path] = field(default_factory=list)


def _candidates(paths: Sequence[str | Path]) -> list[Path]:
    return [f for f in _walk(paths, "*") if f.suffix.lower() in RASTER_SUFFIXES]


def _resolution_m(name: str) -> int:
    m = re.search(r"_(\d+)m\.[^.]+$", name)
    return int(m.group(1)) if m else 0


def find_sensor_scenes(paths: Sequence[str | Path], sensor: str) -> SensorScan:
    """Files under `paths` named like `sensor`'s products, grouped by scene (see the module docstring). For
    one-file sensors (NAIP) each file is a scene holding every band (key '*')."""

    cls = sensor_dataset_class(sensor)
    names = _sensor_band_names(sensor, cls)
    regex = cls.filename_regex
    if "{}" in regex:  # Sentinel2 formats the resolution suffix in (the first band's); any here
        regex = regex.format(r"\d+m")
    pattern = re.compile(regex, re.VERBOSE)
    glob = cls.filename_glob.replace("{}", "*")
    native = getattr(cls, "resolutions", {})
    scan = SensorScan({}, names)
    for f in _candidates(paths):
        m = pattern.match(f.name) if fnmatch.fnmatch(f.name, glob) else None
        if m is None:
            continue
        if not (cls.separate_files and "band" in m.groupdict()):
            scan.scenes[str(f)] = {"*": f}
            continue
        band = m.group("band")
        if band not in names:
            scan.other.append(f)
            continue
        folder = f.parent.parent if _RESOLUTION_DIR.match(f.parent.name) else f.parent  # SAFE: IMG_DATA/R10m
        key = str(folder / (f.name[: m.start("band")] + "{band}"))
        bands = scan.scenes.setdefault(key, {})
        scan.dates[key] = m.groupdict().get("date") or ""
        if band in bands:  # one band at several resolutions (L2A): its native one, else the finest
            want = int(str(native.get(band, "0m"))[:-1])
            bands[band] = min(bands[band], f, key=lambda p: (_resolution_m(p.name) != want, _resolution_m(p.name)))
        else:
            bands[band] = f
    return scan


def _refuse_unmatched(paths, sensor: str, scan: SensorScan) -> None:
    """No file follows `sensor`'s naming: multi-band files are read generically (module docstring), but only
    auxiliary files of the sensor, or several single-band files, are refused with the expected names."""
    files = _candidates(paths)
    single = [f for f in files[:64] if len(raster_meta(f).names) == 1]
    if scan.other or (len(single) >= 2 and len(single) == len(files[:64])):
        raise DataError(f"data.sensor={sensor}: expected files named like {SENSOR_NAMING[sensor]}; found "
                        f"{'only auxiliary files ' if scan.other and len(scan.other) == len(files) else ''}"
                        f"{_listing(files)} under {', '.join(map(str, paths))} (for other files set data.sensor=null)")


def _reader_class(cls, band_files: dict[str, dict[str, Path]]):
    """`cls` reading each band from the file grouped for its scene (torchgeo swaps the band name in the file name,
    which misses resolution folders and suffixes) and accepting any resolution suffix."""
    attrs: dict = {}
    if cls.separate_files:
        def _update_filepath(self, band: str, filepath: str) -> str:
            return str(band_files[str(filepath)][band])

        attrs["_update_filepath"] = _update_filepath
    if "{}" in cls.filename_regex:
        attrs["filename_regex"] = cls.filename_regex.replace("{}", r"\d+m")
    return type(cls.__name__, (cls,), attrs)


class ChipRead(NamedTuple):
    """One chip as read: raw DN (C, S, S), valid mask (S, S), scaling group, index entry, bounds in the CRS."""

    raw: torch.Tensor
    valid: torch.Tensor
    group: int
    entry: int
    bounds: tuple[float, float, float, float]


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
        scale: float | None = None,
        crs=None,
        res: float | None = None,
        nodata_max_fraction: float = 0.5,
        length: int = 10000,
        seed: int = 0,
        max_redraws: int = 20,
        sensor: str | None = None,
        chip_indices: Sequence[int] | None = None,
        offset: float | None = None,
        rows: Sequence[float] | None = None,
    ):
        self.sensor = None
        sensor_key = str(sensor).lower() if sensor else None
        scan = None
        if sensor_key in SENSOR_DATASETS:
            scan = find_sensor_scenes(paths, sensor_key)
            if scan.scenes:
                self.sensor = sensor_key
            else:
                _refuse_unmatched(paths, sensor_key, scan)
                log.info("sensor=%s: no file under %s follows the %s naming; reading generic GeoTIFFs",
                         sensor, ", ".join(map(str, paths)), SENSOR_DATASETS[sensor_key])
        self.chip_indices = None if chip_indices is None else np.asarray(chip_indices, dtype=np.int64)
        if self.chip_indices is not None and self.chip_indices.size == 0:
            raise DataError("the chip list is empty")
        self.nodata = 0.0
        self.chip_size = int(chip_size)
        self.nodata_max_fraction = float(nodata_max_fraction)
        self.length = int(length)
        self.seed = int(seed)
        self.max_redraws = int(max_redraws)
        self.skipped_nodata = 0
        self.fill: torch.Tensor | None = None
        self._checked: str | None = None
        self.rows = (0.0, 1.0) if rows is None else (float(rows[0]), float(rows[1]))
        if not 0.0 <= self.rows[0] < self.rows[1] <= 1.0:
            raise DataError(f"data.rows={list(self.rows)} must be two fractions 0 <= top < bottom <= 1 of each raster's "
                            "height")
        scale = check_scale(scale)
        if self.sensor is not None:
            self._init_sensor(scan, bands, crs, res, scale, offset)
        else:
            self._init_generic(paths, bands, filename_glob, crs, res, scale, offset)
        self._init_bounds(paths)

    # -- construction -------------------------------------------------------------------------------
    def _init_sensor(self, scan: SensorScan, bands, crs, res, scale, offset) -> None:
        cls = sensor_dataset_class(self.sensor)
        scenes, names = scan.scenes, scan.names
        keys = sorted(scenes)
        if cls.separate_files:
            if bands is None:  # every reflective band of the sensor present in every scene, in sensor order
                bands = [b for b in _default_bands(self.sensor, names) if all(b in scenes[k] for k in keys)]
                if not bands:
                    have = "; ".join(f"{Path(k).name.replace('{band}', '*')}: {', '.join(sorted(scenes[k]))}"
                                     for k in keys[:4])
                    raise DataError(f"no {cls.__name__} band is present in every scene under "
                                    f"{Path(keys[0]).parent} ({have}); one product level per source, with files "
                                    f"named like {SENSOR_NAMING[self.sensor]}")
            select_bands(names, list(bands), where=f"{cls.__name__} band names")  # a misspelt name, not a file
            for k in keys:
                missing = [b for b in bands if b not in scenes[k]]
                if missing:
                    b0, f0 = next(iter(scenes[k].items()))
                    expected = f0.parent / f0.name.replace(b0, missing[0], 1)
                    raise DataError(f"band{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found for "
                                    f"{cls.__name__} scene {Path(k).name.replace('{band}', '*')} (no file like "
                                    f"{expected}; bands on disk: {', '.join(sorted(scenes[k]))})")
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
        metas = [raster_meta(f) for f in self.files]
        self._warn_unknown_s2_baseline(keys, scan.dates, metas, offset)
        band_files = {str(scenes[k][self.band_names[0]] if cls.separate_files else scenes[k]["*"]):
                      scenes[k] for k in keys}
        self._init_readers(_reader_class(cls, band_files), metas, crs, res, scale, offset, {"bands": self.band_names})

    def _warn_unknown_s2_baseline(self, keys, dates, metas, offset) -> None:
        if self.sensor != "sentinel2" or offset is not None:
            return
        unknown = [f for k, f, m in zip(keys, self.files, metas)
                   if dates.get(k, "")[:8] >= S2_BASELINE_04_DATE and detect_offset(f, m.tags) is None]
        if unknown:
            log.warning("%d Sentinel-2 scene%s acquired from %s on (%s) carry no processing baseline (no "
                        "BOA_ADD_OFFSET / RADIO_ADD_OFFSET / PROCESSING_BASELINE tag, MTD_MSI*.xml or _N0400_ product "
                        "name): read with offset 0; products of baseline 04.00 or later need data.offset=-1000",
                        len(unknown), "s" if len(unknown) > 1 else "", S2_BASELINE_04_DATE, _listing(unknown, 3))

    def _init_generic(self, paths, bands, filename_glob, crs, res, scale, offset) -> None:
        self.files = find_rasters(paths, filename_glob)
        metas = [raster_meta(f) for f in self.files]
        names = metas[0].names
        for f, m in zip(self.files[1:], metas[1:]):
            if m.names != names:
                raise DataError(
                    f"raster {f} has bands {m.names}, but {self.files[0]} has {names}; "
                    "a source needs one band layout (split it into several sources)"
                )
        self._refuse_per_band_files(metas)
        idx = select_bands(names, list(bands) if bands is not None else None, where=str(self.files[0]))
        self.band_names = [names[i] for i in idx]
        cls = type(
            "GeodinoGeoTiffs",
            (RasterDataset,),
            {"filename_glob": filename_glob, "all_bands": tuple(names), "is_image": True, "separate_files": False},
        )
        self._init_readers(cls, metas, crs, res, scale, offset, {"bands": self.band_names})

    def _refuse_per_band_files(self, metas) -> None:
        """Several single-band files whose names end like different bands are the bands of a product, not a 1-band
        data set."""
        if len(self.files) < 2 or len(metas[0].names) != 1:
            return
        band_like = [f for f in self.files if _BAND_LIKE.search(f.stem)]
        if len({_BAND_LIKE.search(f.stem).group(0).upper() for f in band_like}) > 1:  # several bands, not tiles
            stems = " ".join(f.name for f in band_like)
            guess = ("landsat8" if "LC08_" in stems else "landsat9" if "LC09_" in stems
                     else "sentinel2" if re.search(r"\bT\d{2}[A-Z]{3}_", stems) else "sentinel2|landsat8|landsat9")
            raise DataError(f"{len(self.files)} single-band files named like bands of one product "
                            f"({_listing(band_like)}) would train a 1-band model on every band and QA file alike: "
                            f"set data.sensor={guess} to stack them by band, or give stacked multi-band GeoTIFFs")

    def _init_readers(self, cls, metas, crs, res, scale, offset, kw) -> None:
        """One torchgeo dataset per (scale, offset) pair the files need (module docstring)."""
        # the files' data type (the chip store keeps chips in it; mixed types are read as float32)
        dtypes = {np.dtype(m.dtype) for m in metas}
        self.dtype = dtypes.pop().name if len(dtypes) == 1 else "float32"
        self.nodata = 0.0 if metas[0].nodata is None else float(metas[0].nodata)
        scalings = [resolve_scaling(f, m.dtype, m.tags, scale, offset) for f, m in zip(self.files, metas)]
        groups: dict[tuple[float, float], list[int]] = {}
        for i, s in enumerate(scalings):
            groups.setdefault((s.scale, s.offset), []).append(i)
        self.scalings: list[Scaling] = [scalings[idx[0]] for idx in groups.values()]
        self.file_groups = [[self.files[i] for i in idx] for idx in groups.values()]
        counts = Counter({g: len(idx) for g, idx in enumerate(groups.values())})
        self.scaling = self.scalings[counts.most_common(1)[0][0]]
        if len(self.scalings) > 1:
            log.info("the files need %d scalings: %s", len(self.scalings),
                     "; ".join(f"{s.describe()} for {len(fs)} file{'s' if len(fs) > 1 else ''}"
                               for s, fs in zip(self.scalings, self.file_groups)))
        self._datasets = []
        for files in self.file_groups:
            extra = {} if res is None else {"res": res}
            ds = cls(paths=[str(f) for f in files], crs=crs, **extra, **kw)
            self._datasets.append(ds)
            crs, res = ds.crs, ds.res  # later groups on the first one's grid
        self.dataset = self._datasets[0]

    def _init_bounds(self, paths) -> None:
        # Weight files by area, as RandomGeoSampler does, so big scenes are drawn more often.
        self._areas, self._bounds, self._group = [], [], []
        for g, ds in enumerate(self._datasets):
            for geom in ds.index.geometry:
                xmin, ymin, xmax, ymax = geom.bounds
                # data.rows: chips come from this band of rows (fractions of the height, north = 0) of each raster
                top, bottom = self.rows
                ymin, ymax = ymax - bottom * (ymax - ymin), ymax - top * (ymax - ymin)
                self._bounds.append((xmin, ymin, xmax, ymax))
                self._areas.append(max(xmax - xmin, 0) * max(ymax - ymin, 0))
                self._group.append(g)
        self.res = self.dataset.res
        self._usable, self._probs, self._size_m = self._sampling(self.chip_size)
        if not self._usable:
            raise DataError(
                f"chip_size {self.chip_size} px ({self._size_m[1]:.0f} m) is larger than every raster "
                f"under {paths} at {self.res[0]:g} m resolution"
            )

    def _sampling(self, size: int):
        """(rasters a chip of `size` px fits in, their area weights, the chip size in CRS units)."""
        size_m = (size * self.res[1], size * self.res[0])
        ok = [i for i, (x0, y0, x1, y1) in enumerate(self._bounds) if x1 - x0 >= size_m[1] and y1 - y0 >= size_m[0]]
        w = np.array([self._areas[i] for i in ok], dtype=np.float64)
        return ok, torch.as_tensor(w / w.sum() if ok else w), size_m

    # -- properties -----------------------------------------------------------------------------------
    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    @property
    def crs(self):
        return self.dataset.crs

    @property
    def scale(self) -> float:
        """The scale most files use (recorded in the contract)."""
        return self.scaling.scale

    @property
    def offset(self) -> float:
        """The offset (DN) most files use (recorded in the contract)."""
        return self.scaling.offset

    def __len__(self) -> int:
        return self.length

    def fill_nodata(self, values: Sequence[float] | None) -> None:
        """Per-band values (in [0, 1] units) that nodata pixels of items take; None: 0."""
        self.fill = None if values is None else torch.tensor([float(v) for v in values], dtype=torch.float32)

    # -- reading --------------------------------------------------------------------------------------
    def _draw(self, sub_seed: int, size: int, sampling=None) -> ChipRead:
        """The raw chip (C, size, size) in DN, its valid mask, scaling group and footprint, for one sub-seed."""
        usable, probs, size_m = sampling or (self._usable, self._probs, self._size_m)
        g = torch.Generator().manual_seed(sub_seed)
        k = usable[int(torch.multinomial(probs, 1, generator=g))]
        xs, ys = get_random_bounding_box(self._bounds[k], size_m, self.res, generator=g)
        sample = self._datasets[self._group[k]][xs.start : xs.stop : self.res[0], ys.start : ys.stop : self.res[1]]
        img = sample["image"].float()
        # torchgeo rounds the window to whole pixels; trim/pad by at most one pixel to the chip size.
        img = img[:, :size, :size]
        if img.shape[-1] < size or img.shape[-2] < size:
            pad = (0, size - img.shape[-1], 0, size - img.shape[-2])
            img = torch.nn.functional.pad(img, pad, value=self.nodata)
        return ChipRead(img, self.valid_mask(img), self._group[k], k, (xs.start, ys.start, xs.stop, ys.stop))

    def _read(self, index: int, size: int | None = None, seed: int | None = None) -> ChipRead:
        """`_draw` of chip `index` after nodata redraws."""
        size = self.chip_size if size is None else size
        sampling = None if size == self.chip_size else self._sampling(size)
        seed = self.seed if seed is None else seed
        for attempt in range(self.max_redraws):
            sub_seed = (seed * 1_000_003 + int(index)) * 64 + attempt
            read = self._draw(sub_seed, size, sampling)
            frac = 1.0 - float(read.valid.float().mean())
            if frac <= self.nodata_max_fraction:
                return read
            self.skipped_nodata += 1
            log.debug("chip %d draw %d skipped: %.0f%% nodata", index, attempt, 100 * frac)
        raise DataError(
            f"{self.max_redraws} consecutive chips were more than {self.nodata_max_fraction:.0%} nodata "
            f"in {', '.join(str(f) for f in self.files[:3])}{'...' if len(self.files) > 3 else ''}; "
            "check the rasters' nodata value or lower data.nodata_max_fraction"
        )

    def _scaled(self, img: torch.Tensor, valid: torch.Tensor, group: int) -> torch.Tensor:
        x = self.scalings[group].apply(img)
        fill = self.fill if self.fill is not None else torch.zeros(img.shape[0])
        return torch.where(valid, x, fill.to(x.dtype)[:, None, None])

    def chip(self, index: int) -> torch.Tensor:
        """The raw chip (digital numbers; NaN where the file has NaN) for `index`, after nodata redraws."""
        return self._read(index).raw

    def read_chip(self, index: int) -> ChipRead:
        """Chip `index` (a chip index, not an item) with its mask, scaling group and footprint (the chip store)."""
        return self._read(index)

    def footprint_file(self, read: ChipRead) -> str:
        """The file (or the scene's first band file) a chip was read from."""
        ds = self._datasets[read.group]
        offset = sum(len(d.index) for d in self._datasets[: read.group])
        return str(ds.index.iloc[read.entry - offset]["filepath"]) if "filepath" in ds.index else ""

    def item_with_footprint(self, index: int) -> tuple[torch.Tensor, dict]:
        """Item `index` (as ``self[index]``, one read) and where it comes from: ``chip`` (its chip index), ``file``,
        ``bounds`` (minx, miny, maxx, maxy of the chip's window in ``crs``, the source's CRS: every chip is read on
        that grid) and ``valid_fraction`` (share of pixels holding data)."""
        chip = self.chip_index(index)
        read = self._read(chip)
        return self._scaled(read.raw, read.valid, read.group), {
            "chip": chip, "file": self.footprint_file(read), "bounds": [float(b) for b in read.bounds],
            "crs": crs_string(self.crs), "valid_fraction": float(read.valid.float().mean())}

    def chip_index(self, index: int) -> int:
        """The chip index item `index` reads: itself, or its entry in the chip list."""
        if self.chip_indices is None:
            return int(index)
        return int(self.chip_indices[int(index) % len(self.chip_indices)])

    def valid_mask(self, img: torch.Tensor) -> torch.Tensor:
        """(H, W) True where a raw chip holds data (module docstring: not nodata in every band, no NaN)."""
        return torch.from_numpy(valid_mask(img.numpy(), self.nodata))

    def __getitem__(self, index: int) -> torch.Tensor:
        read = self._read(self.chip_index(index))
        return self._scaled(read.raw, read.valid, read.group)

    def item_with_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item `index` in [0, 1], (H, W) mask of pixels holding data) (see geodino.data.stats)."""
        read = self._read(self.chip_index(index))
        return self._scaled(read.raw, read.valid, read.group), read.valid

    def preview(self, size: int = 160, multiple: int = 16, seed: int = 12345) -> torch.Tensor:
        """One larger chip (C, S, S) in [0, 1], S <= `size` a multiple of `multiple` that fits every raster, for
        figures (e.g. the PCA feature map written at the end of training)."""
        side = min(size, *(int((b[2] - b[0]) / self.res[0]) for b in self._bounds),
                   *(int((b[3] - b[1]) / self.res[1]) for b in self._bounds))
        side -= side % multiple
        if side <= 0:
            raise DataError(f"the rasters of this source are smaller than {multiple} px: no preview")
        read = self._read(0, size=side, seed=seed)
        return self._scaled(read.raw, read.valid, read.group)

    def check_scaling(self, n: int = 8) -> str | None:
        """Warn (once per source) when `n` chips look implausibly scaled (geodino.data.geotiff.scaling_problem);
        returns the warning. A source whose chips cannot be read is left to fail where it is read."""
        if self._checked is not None:
            return self._checked or None
        skipped, per_group = self.skipped_nodata, {}
        try:
            for i in range(int(n)):
                img, valid, group = self._read(i)[:3]
                x = self.scalings[group].unclipped(img[:, valid])
                per_group.setdefault(group, []).append(x[:, :: max(1, x.shape[1] // 4096)])
        except DataError:
            pass
        finally:
            self.skipped_nodata = skipped
        problems = [scaling_problem(torch.cat(xs, 1).numpy(), self.scalings[g], self.band_names,
                                    _listing(self.file_groups[g], 2)) for g, xs in per_group.items()]
        self._checked = next((p for p in problems if p), "")
        if self._checked:
            log.warning(self._checked)
        return self._checked or None
