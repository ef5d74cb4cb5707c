"""The chip store: fixed-size chips of a raster archive, cut once and read back by index at memory speed.

Random windows through torchgeo's `RasterDataset` (R-tree lookup, warped / merged window reads, decompression) cost
most of a training step on a CPU worker. `geodino curate action=chip` reads each chip of a `data=` raster source
once — the same chips training draws, same nodata rules, same chip identity (index ``i`` is
``RasterSource(seed, chip_size)[i]``, so curated chip lists keep addressing the same chips) — and writes them in
their native dtype (uint16 digital numbers stay uint16) to the store:

    <store>/store.json          format, bands, dtype, chip size, nodata, scale / offset, CRS list, source files,
                                band statistics, shard sizes
    <store>/index.npz           per chip: shard, row, source_file (index into store.json "files"), bounds (minx, miny, maxx, maxy in its CRS),
                                valid-pixel fraction, the source chip index
    <store>/shard_00000.npy     (n, C, S, S) chips, memory-mapped on read

Format choice: plain NumPy ``.npy`` shards. They memory-map with no dependency, read one chip with one slice (no
decompression, no tar walk), keep the raw dtype, and any tool can open them; WebDataset / LitData streams are
sequential by design and would break index-addressed sampling (exact resume and worker independence), and zarr
would add chunk decompression per read for no gain on fixed-size chips. The cost is disk: chips are stored raw.

`ChipStore` is a data source (``data=chips data.paths=[<store>]``): ``store[i]`` is chip ``i`` scaled to [0, 1],
``item_with_mask(i)`` adds the valid-pixel mask, ``chip_index(i)`` honours a chip list.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from geodino.data.geotiff import Scaling, crs_string
from geodino.errors import DataError

log = logging.getLogger("geodino")

STORE_FORMAT = "geodino chip store v1"
STORE_FILE = "store.json"
INDEX_FILE = "index.npz"


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


def write_chip_store(source, out: str | Path, n_chips: int, shard_size: int = 4096, meta: dict | None = None,
                     progress: bool = False) -> Path:
    """Cut chips ``0..n_chips-1`` of a `RasterSource` into a store at `out` (see the module docstring).

    `meta` adds entries to ``store.json`` (e.g. the band statistics). The store is written into ``<out>.partial``
    and renamed when complete, so an interrupted cut never looks like a store."""
    out = Path(out)
    if out.exists():
        raise DataError(f"chip store {out} already exists; choose another out= or delete it")
    if n_chips < 1:
        raise DataError(f"n_chips={n_chips}: a chip store needs at least one chip")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(source.dtype)
    integer = np.issubdtype(dtype, np.integer)
    c, s = source.n_bands, source.chip_size
    n_shards = -(-n_chips // shard_size)
    shard, shards = None, []
    index = {k: [] for k in ("shard", "row", "file", "bounds", "valid_fraction", "chip", "scaling")}
    files: dict[str, int] = {}
    for i in tqdm(range(n_chips), desc="cutting chips", disable=not progress):
        k, r = divmod(i, shard_size)
        if r == 0:
            if shard is not None:
                shard.flush()
            rows_k = min(shard_size, n_chips - k * shard_size)
            shard = np.lib.format.open_memmap(tmp / _shard_name(k), mode="w+", dtype=dtype, shape=(rows_k, c, s, s))
            shards.append(rows_k)
        chip = source.chip_index(i)
        read = source.read_chip(chip)
        values = read.raw.numpy()
        shard[r] = np.rint(values).astype(dtype) if integer else values.astype(dtype, copy=False)
        index["shard"].append(k)
        index["row"].append(r)
        index["file"].append(files.setdefault(source.footprint_file(read), len(files)))
        index["bounds"].append(read.bounds)
        index["valid_fraction"].append(float(read.valid.float().mean()))
        index["chip"].append(chip)
        index["scaling"].append(read.group)
    shard.flush()
    del shard
    np.savez(tmp / INDEX_FILE, shard=np.asarray(index["shard"], np.int32), row=np.asarray(index["row"], np.int32),
             source_file=np.asarray(index["file"], np.int32), bounds=np.asarray(index["bounds"], np.float64),
             valid_fraction=np.asarray(index["valid_fraction"], np.float32), chip=np.asarray(index["chip"], np.int64),
             scaling=np.asarray(index["scaling"], np.int32))
    doc = {"format": STORE_FORMAT, "n_chips": int(n_chips), "shards": shards, "shard_size": int(shard_size),
           "chip_size": int(s), "bands": list(source.band_names), "dtype": dtype.name, "nodata": source.nodata,
           "scale": float(source.scale), "offset": float(source.offset),
           "scalings": [{"scale": float(sc.scale), "offset": float(sc.offset), "why": sc.why} for sc in source.scalings],
           "crs": crs_string(source.crs),
           "files": list(files), "seed": int(source.seed), "sensor": source.sensor, **(meta or {})}
    (tmp / STORE_FILE).write_text(json.dumps(doc, indent=2))
    tmp.rename(out)
    log.info("wrote %d chips (%d x %d px, %d bands, %s) in %d shard(s) to %s", n_chips, s, s, c, dtype.name, n_shards,
             out)
    return out


class ChipStore(torch.utils.data.Dataset):
    """A chip store as a data source, addressed by index (item ``i`` is chip ``i mod n``, or its chip list entry)."""

    def __init__(self, path: str | Path, chip_indices: Sequence[int] | None = None, length: int | None = None):
        self.path = Path(str(path)).expanduser()
        meta_file = self.path / STORE_FILE
        if not meta_file.is_file():
            raise DataError(f"{self.path} is not a chip store (no {STORE_FILE}); cut one with "
                            "`geodino curate action=chip data=sat data.paths=[...] out=<store>`")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_file}: not valid JSON ({e})") from None
        if self.meta.get("format") != STORE_FORMAT:
            raise DataError(f"{meta_file}: format {self.meta.get('format')!r} is not {STORE_FORMAT!r}")
        with np.load(self.path / INDEX_FILE) as z:
            self.index = {k: z[k] for k in z.files}
        self.shards = [np.load(self.path / _shard_name(k), mmap_mode="r") for k in range(len(self.meta["shards"]))]
        self.n_chips = int(self.meta["n_chips"])
        self.band_names = list(self.meta["bands"])
        self.chip_size = int(self.meta["chip_size"])
        self.scale = float(self.meta["scale"])
        self.offset = float(self.meta.get("offset", 0.0))
        self.scalings = [Scaling(float(sc["scale"]), float(sc.get("offset", 0.0)), str(sc.get("why", "")))
                         for sc in self.meta.get("scalings") or [{"scale": self.scale, "offset": self.offset}]]
        self.fill: torch.Tensor | None = None
        nodata = self.meta.get("nodata")
        self.nodata = 0.0 if nodata is None else float(nodata)
        self.files = [Path(f) for f in self.meta.get("files", [])]
        self.crs = self.meta.get("crs")
        self.seed = int(self.meta.get("seed", 0))
        self.sensor = self.meta.get("sensor")
        self.chip_indices = None if chip_indices is None else np.asarray(chip_indices, dtype=np.int64)
        if self.chip_indices is not None:
            bad = self.chip_indices[(self.chip_indices < 0) | (self.chip_indices >= self.n_chips)]
            if bad.size:
                raise DataError(f"the chip list addresses chips {bad[:5].tolist()} but store {self.path} holds "
                                f"{self.n_chips} chips")
        self.length = int(length) if length is not None else self.n_chips
        self.skipped_nodata = 0

    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    def __len__(self) -> int:
        return self.length

    def chip_index(self, index: int) -> int:
        if self.chip_indices is not None:
            return int(self.chip_indices[int(index) % len(self.chip_indices)])
        return int(index) % self.n_chips

    def raw(self, chip: int) -> np.ndarray:
        """Chip `chip` as stored (native dtype, (C, S, S))."""
        return self.shards[int(self.index["shard"][chip])][int(self.index["row"][chip])]

    def valid_mask(self, raw) -> torch.Tensor:
        raw = torch.as_tensor(np.asarray(raw))
        valid = ~(raw == self.nodata).all(dim=0)
        if raw.is_floating_point():
            valid &= ~torch.isnan(raw).any(dim=0)
        return valid

    def fill_nodata(self, values: Sequence[float] | None) -> None:
        """Per-band values (in [0, 1] units) that nodata pixels of items take; None: 0 (as RasterSource)."""
        self.fill = None if values is None else torch.tensor([float(v) for v in values], dtype=torch.float32)

    def _item(self, chip: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.from_numpy(np.asarray(self.raw(chip), dtype=np.float32))
        sc = self.scalings[int(self.index["scaling"][chip])]
        if self.index["valid_fraction"][chip] >= 1.0:
            # no nodata or NaN pixel (recorded when the chip was cut): the scaling in place on the fresh float copy,
            # and no mask
            return sc.apply_(raw), torch.ones(raw.shape[-2:], dtype=torch.bool)
        valid = self.valid_mask(raw)
        x = sc.apply(raw)
        fill = self.fill if self.fill is not None else torch.zeros(raw.shape[0])
        return torch.where(valid, x, fill[:, None, None]), valid

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._item(self.chip_index(index))[0]

    def item_with_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._item(self.chip_index(index))

    def footprint(self, index: int) -> dict:
        """Where chip `index` comes from: source file, bounds in its CRS, valid fraction, original chip index."""
        chip = self.chip_index(index)
        f = int(self.index["source_file"][chip])
        return {"file": str(self.files[f]) if 0 <= f < len(self.files) else None,
                "bounds": self.index["bounds"][chip].tolist(), "crs": self.crs,
                "scaling": self.scalings[int(self.index["scaling"][chip])].describe(),
                "valid_fraction": float(self.index["valid_fraction"][chip]), "chip": int(self.index["chip"][chip])}

    def item_with_footprint(self, index: int) -> tuple[torch.Tensor, dict]:
        """Item `index` and its `footprint`, with ``chip`` its index in this store (as a chip list of it says) and
        ``source_chip`` the raster source's chip index it was cut from."""
        fp = self.footprint(index)
        fp["source_chip"], fp["chip"] = fp["chip"], self.chip_index(index)
        return self[index], fp

    def preview(self, size: int = 160, multiple: int = 16) -> torch.Tensor:
        """The first chip, centre-cropped (or resized) to S <= `size` a multiple of `multiple`, for figures."""
        x = self[0]
        side = min(size, self.chip_size)
        side -= side % multiple
        top = (self.chip_size - side) // 2
        return x[:, top:top + side, top:top + side]
