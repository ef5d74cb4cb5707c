"""Data sources: `RasterSource` (GeoTIFF / COG folders on torchgeo) and `FolderSource` (photos).

`build_source(data_cfg, seed)` turns a `data=` config into a source and its band contract
(band names, RGB band indices, normalisation mean/std, input scaling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from geodino.data.bands import rgb_indices
from geodino.errors import DataError

log = logging.getLogger("geodino")


@dataclass
class SourceInfo:
    source: object
    band_names: list[str]
    mean: list[float]
    std: list[float]
    input_scale: str
    rgb_indices: tuple[int, int, int] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_bands(self) -> int:
        return len(self.band_names)


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


def build_source(data_cfg, seed: int = 0, progress: bool = False) -> SourceInfo:
    kind = str(data_cfg.kind)
    if kind == "raster":
        from geodino.data.sources.raster import RasterSource, band_statistics

        paths = _paths(data_cfg)
        if paths is None:
            from geodino.data.sample import sample_sat_path

            paths = [str(sample_sat_path())]
        src = RasterSource(
            paths,
            chip_size=int(data_cfg.chip_size),
            bands=list(data_cfg.bands) if data_cfg.get("bands") is not None else None,
            filename_glob=str(data_cfg.get("filename_glob", "*.tif")),
            scale=float(data_cfg.scale),
            nodata_max_fraction=float(data_cfg.get("nodata_max_fraction", 0.5)),
            length=int(data_cfg.get("samples_per_epoch", 10000)),
            seed=seed,
        )
        if data_cfg.get("mean") is not None and data_cfg.get("std") is not None:
            mean, std = [float(x) for x in data_cfg.mean], [float(x) for x in data_cfg.std]
            if len(mean) != src.n_bands or len(std) != src.n_bands:
                raise DataError(f"data.mean/std have {len(mean)}/{len(std)} values but the source has {src.n_bands} bands ({', '.join(src.band_names)})")
        else:
            # Statistics of the data itself, from a fixed set of chips (recorded in every checkpoint).
            mean, std = band_statistics(src, n=32, progress=progress)
            log.info("band statistics from 32 chips: mean %s std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
        return SourceInfo(src, list(src.band_names), mean, std,
                          input_scale=f"digital numbers / {float(data_cfg.scale):g}, clipped to [0, 1], then (x - mean) / std",
                          rgb_indices=rgb_indices(src.band_names, data_cfg.get("sensor")),
                          extra={"files": [str(f) for f in src.files], "crs": str(src.crs)})
    if kind == "folder":
        from geodino.data.sources.folder import FolderSource

        paths = _paths(data_cfg)
        if paths is None:
            from geodino.data.sample import sample_nat_dir

            paths = [str(sample_nat_dir())]
        src = FolderSource(paths, file_list=data_cfg.get("file_list"), min_size=int(data_cfg.get("min_size", 32)),
                           length=int(data_cfg.get("samples_per_epoch", 10000)))
        return SourceInfo(src, ["R", "G", "B"], [float(x) for x in data_cfg.mean], [float(x) for x in data_cfg.std],
                          input_scale="uint8 RGB / 255, then (x - mean) / std", rgb_indices=(0, 1, 2),
                          extra={"skipped": dict(src.skipped)})
    raise DataError(f"data.kind must be raster or folder, got '{kind}'")
