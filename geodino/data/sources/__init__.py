"""Data sources: `RasterSource` (GeoTIFF / COG folders on torchgeo), `FolderSource` (photos) and a weighted mix of
named sources (`data=mix`, geodino.data.mixing).

`build_source(data_cfg, seed)` turns a `data=` config into a source and its band contract
(band names, RGB band indices, normalisation mean/std, input scaling: the prose `input_scale` and the numbers
`scale` / `offset`, ``clip((DN + offset) / scale, 0, 1)``; `data.scale` / `data.offset` null follow the data type and
the product, geodino.data.geotiff).

Normalisation comes from `data.mean`/`data.std` when both are set, else from `data.stats_file` (a
`band_stats.json` written by `geodino curate action=stats`, matched by band name), else from the
statistics of a fixed set of chips. `data.chip_list` (raster) and `data.file_list` (folder) restrict
a source to the items chosen by `geodino curate action=balance|retrieve`. Raster nodata pixels are filled with the
normalisation mean (they normalise to 0; `SourceInfo.with_stats` keeps that true for other statistics), and a few
chips are checked for implausible scaling (a warning naming the file, band and scale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from geodino.config import configs_dir
from geodino.contract import Contract
from geodino.data.bands import rgb_indices
from geodino.data.lists import read_chip_list
from geodino.data.mixing import MixedDataset, mix_sources
from geodino.data.sample import sample_nat_dir, sample_sat_path
from geodino.data.sources.chips import ChipStore
from geodino.data.sources.folder import FolderSource
from geodino.data.sources.raster import RasterSource
from geodino.data.stats import band_statistics, load_stats_file
from geodino.errors import DataError

log = logging.getLogger("geodino")


@dataclass(frozen=True)
class SourceInfo:
    source: object
    band_names: list[str]
    mean: list[float]
    std: list[float]
    input_scale: str
    rgb_indices: tuple[int, int, int] | None = None
    extra: dict = field(default_factory=dict)
    scale: float | None = None  # raw values -> [0, 1]: clip((DN + offset) / scale, 0, 1); None: by data type
    offset: float = 0.0

    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    def with_stats(self, mean, std) -> "SourceInfo":
        """The same source normalised with other statistics (e.g. a predecessor's or a teacher's); its nodata
        pixels take the new mean."""
        _fill_nodata(self.source, mean)
        return replace(self, mean=[float(m) for m in mean], std=[float(s) for s in std])

    def contract(self, base: Contract) -> Contract:
        """`base` (an architecture) fed this data: its bands, normalisation and input scaling."""
        return base.with_data(bands=self.band_names, mean=self.mean, std=self.std, input_scale=self.input_scale,
                              scale=self.scale, offset=self.offset)


def _fill_nodata(source, mean) -> None:
    """Nodata pixels of a raster source take the normalisation mean, so they normalise to 0."""
    if hasattr(source, "fill_nodata") and mean:
        source.fill_nodata(mean)


def _paths(data_cfg) -> list[str] | None:
    if OmegaConf.is_missing(data_cfg, "paths"):
        raise DataError(
            f"data={data_cfg.name} needs data.paths: point it at your folder(s), "
            f"e.g. data.paths=[/data/my_tifs]"
        )
    paths = data_cfg.paths
    if paths is None:
        return None
    if isinstance(paths, str):
        return [paths]
    return [str(p) for p in paths]


def build_source(data_cfg, seed: int = 0, progress: bool = False, stats: bool = True, batch_size: int | None = None,
                 world_size: int = 1) -> SourceInfo:
    """The source and band contract of a `data=` config (kind raster, folder or mix).

    `stats=False` skips computing statistics when no mean/std/stats_file is given (mean/std stay empty).
    `batch_size` / `world_size` (images per process and step, processes): a mix assigns sources per batch slot,
    so it needs the batch layout the trainer uses."""
    kind = str(data_cfg.kind)
    if kind == "raster":
        return _raster_source(data_cfg, seed, progress, stats)
    if kind == "chips":
        return _chip_store_source(data_cfg, progress, stats)
    if kind == "folder":
        return _folder_source(data_cfg)
    if kind == "mix":
        return _mix_source(data_cfg, seed, progress, stats, batch_size, world_size)
    raise DataError(f"data.kind must be raster, chips, folder or mix, got '{kind}'")


def _raster_source(data_cfg, seed: int, progress: bool, stats: bool) -> SourceInfo:
    paths = _paths(data_cfg)
    if paths is None:
        paths = [str(sample_sat_path())]
    chip_indices, chip_seed, meta = None, seed, {}
    if data_cfg.get("chip_list"):
        chip_indices, meta = read_chip_list(data_cfg.chip_list)
        # Chip identity is fixed by the seed and chip size the list was made with.
        chip_seed = int(meta.get("seed", seed))
        if meta.get("chip_size") is not None and int(meta["chip_size"]) != int(data_cfg.chip_size):
            raise DataError(f"data.chip_list {data_cfg.chip_list} holds {meta['chip_size']} px chips but "
                            f"data.chip_size={data_cfg.chip_size}; set data.chip_size={meta['chip_size']}")
    src = RasterSource(
        paths,
        chip_size=int(data_cfg.chip_size),
        bands=list(data_cfg.bands) if data_cfg.get("bands") is not None else None,
        filename_glob=str(data_cfg.get("filename_glob", "*.tif")),
        scale=data_cfg.get("scale"),
        offset=data_cfg.get("offset"),
        nodata_max_fraction=float(data_cfg.get("nodata_max_fraction", 0.5)),
        length=int(data_cfg.get("samples_per_epoch", 10000)),
        seed=chip_seed,
        sensor=data_cfg.get("sensor"),
        chip_indices=chip_indices,
        rows=data_cfg.get("rows"),
    )
    if chip_indices is not None and meta.get("files"):
        listed = sorted(Path(str(f)).name for f in meta["files"])
        if listed != sorted(f.name for f in src.files):
            log.warning("data.chip_list %s was made on other files (%d listed, %d found): its chip indices "
                        "address different chips here", data_cfg.chip_list, len(listed), len(src.files))
    src.check_scaling()
    mean, std = _statistics(data_cfg, src, list(src.band_names), (src.scale, src.offset), stats, progress)
    _fill_nodata(src, mean)
    rule = src.scaling.describe() if len(src.scalings) == 1 else \
        "per file: " + "; ".join(s.describe() for s in src.scalings)
    return SourceInfo(src, list(src.band_names), mean, std,
                      input_scale=f"{rule}, clipped to [0, 1] (nodata: the mean), then (x - mean) / std",
                      rgb_indices=rgb_indices(src.band_names, data_cfg.get("sensor")),
                      extra={"files": [str(f) for f in src.files], "crs": str(src.crs),
                             "reader": src.sensor or "geotiff", "chip_list": data_cfg.get("chip_list"),
                             "scalings": [{"scale": s.scale, "offset": s.offset, "why": s.why, "files": len(fs)}
                                          for s, fs in zip(src.scalings, src.file_groups)]},
                      scale=src.scale, offset=src.offset)


def _chip_store_source(data_cfg, progress: bool, stats: bool) -> SourceInfo:
    """``data=chips data.paths=[<store>]``: a chip store cut by ``geodino curate action=chip`` (one store; its band
    statistics, computed when it was cut, are the default normalisation)."""
    paths = _paths(data_cfg)
    if not paths or len(paths) != 1:
        raise DataError(f"data=chips reads one chip store: data.paths=[<store folder>], got {paths}")
    chip_indices = None
    if data_cfg.get("chip_list"):
        chip_indices, _ = read_chip_list(data_cfg.chip_list)
    src = ChipStore(paths[0], chip_indices=chip_indices,
                    length=int(data_cfg.samples_per_epoch) if data_cfg.get("samples_per_epoch") else None)
    stored = src.meta.get("stats") or {}
    if data_cfg.get("mean") is None and data_cfg.get("stats_file") is None and stored.get("mean"):
        mean, std = list(stored["mean"]), list(stored["std"])
    else:
        mean, std = _statistics(data_cfg, src, list(src.band_names), (src.scale, src.offset), stats, progress)
    _fill_nodata(src, mean)
    rule = "; ".join(s.describe() for s in src.scalings)
    return SourceInfo(src, list(src.band_names), mean, std,
                      input_scale=f"{rule}, clipped to [0, 1] (nodata: the mean), then (x - mean) / std",
                      rgb_indices=rgb_indices(src.band_names, src.sensor),
                      extra={"store": str(src.path), "files": [str(f) for f in src.files], "crs": src.crs,
                             "reader": "chip store", "chip_list": data_cfg.get("chip_list"), "chips": src.n_chips},
                      scale=src.scale, offset=src.offset)


def _statistics(data_cfg, src, band_names: list[str], scaling: tuple[float, float] | None, stats: bool,
                progress: bool):
    """Normalisation: data.mean/std, else data.stats_file (made with the same `scaling`, (scale, offset), when
    given), else (stats=True) the statistics of 32 items."""
    if data_cfg.get("mean") is not None and data_cfg.get("std") is not None:
        mean, std = [float(x) for x in data_cfg.mean], [float(x) for x in data_cfg.std]
        if len(mean) != len(band_names) or len(std) != len(band_names):
            raise DataError(f"data.mean/std have {len(mean)}/{len(std)} values but the source has {len(band_names)} "
                            f"bands ({', '.join(band_names)})")
        return mean, std
    if data_cfg.get("stats_file"):
        return load_stats_file(data_cfg.stats_file, band_names, *(scaling or ()))
    if not stats:
        return [], []
    # Statistics of the data itself, from a fixed set of chips (recorded in every checkpoint).
    mean, std = band_statistics(src, n=32, progress=progress)
    log.info("band statistics from 32 chips: mean %s std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
    return mean, std


def _folder_source(data_cfg) -> SourceInfo:
    paths = _paths(data_cfg)
    if paths is None:
        paths = [str(sample_nat_dir())]
    src = FolderSource(paths, file_list=data_cfg.get("file_list"), min_size=int(data_cfg.get("min_size", 32)),
                       length=int(data_cfg.get("samples_per_epoch", 10000)))
    if data_cfg.get("stats_file"):
        mean, std = load_stats_file(data_cfg.stats_file, ["R", "G", "B"])
    else:
        mean, std = [float(x) for x in data_cfg.mean], [float(x) for x in data_cfg.std]
    return SourceInfo(src, ["R", "G", "B"], mean, std,
                      input_scale="uint8 RGB / 255, then (x - mean) / std", rgb_indices=(0, 1, 2),
                      extra={"skipped": dict(src.skipped)}, scale=255.0)


def mix_entry_config(name: str, entry) -> DictConfig:
    """One source of ``data=mix``: its keys on top of ``configs/data/<base>.yaml`` when it names a ``base``."""
    entry = OmegaConf.create(OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else dict(entry))
    base = entry.pop("base", None)
    if base is None:
        return entry
    path = configs_dir() / "data" / f"{base}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (configs_dir() / "data").glob("*.yaml"))
        raise DataError(f"data.sources.{name}.base={base} is not a data config; choose one of {', '.join(choices)}")
    merged = OmegaConf.merge(OmegaConf.load(path), entry)
    if str(merged.kind) == "mix":
        raise DataError(f"data.sources.{name}: a mix cannot contain another mix")
    return merged


def _mix_source(data_cfg, seed: int, progress: bool, stats: bool, batch_size: int | None, world_size: int) -> SourceInfo:
    """``data=mix``: named sources with weights and a share of homogeneous batches (geodino.data.mixing); every
    source has the same bands and is normalised with one set of statistics (data.mean/std, data.stats_file, or
    the mix's own)."""
    if batch_size is None:
        raise DataError("data=mix assigns sources per batch slot: build it with the trainer's batch_size")
    entries = data_cfg.get("sources") or {}
    if not entries:
        raise DataError("data=mix needs data.sources: {name: {base: <data config>, key: value, ...}, ...}")
    infos = {name: build_source(mix_entry_config(name, e), seed, progress, stats=False) for name, e in entries.items()}
    first_name, first = next(iter(infos.items()))
    for name, info in infos.items():
        if list(info.band_names) != list(first.band_names):
            raise DataError(f"data.sources.{name} has bands {', '.join(info.band_names)} but {first_name} has "
                            f"{', '.join(first.band_names)}; a mix needs one band layout (select bands with "
                            "data.sources.<name>.bands)")
    weights = OmegaConf.to_container(data_cfg.weights, resolve=True) if data_cfg.get("weights") is not None else \
        [1.0] * len(infos)
    plan = dict(weights=weights, batch_size=int(batch_size), world_size=int(world_size),
                homogeneous_fraction=float(data_cfg.get("homogeneous_fraction", 0.0)),
                homogeneous_source=data_cfg.get("homogeneous_source"), seed=seed)
    provisional = MixedDataset({n: i.source for n, i in infos.items()}, **plan)
    mean, std = _statistics(data_cfg, provisional, list(first.band_names), None, stats, progress)
    mixed = mix_sources({n: i.with_stats(mean, std) for n, i in infos.items()}, **plan)
    return SourceInfo(mixed, list(first.band_names), mean, std, input_scale=first.input_scale,
                      rgb_indices=first.rgb_indices, scale=first.scale, offset=first.offset,
                      extra={"sources": {n: i.extra for n, i in infos.items()}, "weights": weights,
                             "homogeneous_fraction": plan["homogeneous_fraction"],
                             "homogeneous_source": plan["homogeneous_source"]})
