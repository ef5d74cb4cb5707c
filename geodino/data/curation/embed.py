"""Embedding a pool for curation, and the embed-output format.

`embed_source` runs a backbone over a data source and returns L2-normalised CLS embeddings
(``forward_features(x)["x_norm_clstoken"]``), streamed to a disk-backed ``.npy``
(``np.lib.format.open_memmap``) so pools larger than memory work (Vo et al. 2024, arXiv 2405.15613:
curation works on SSL embeddings of the pool).

An embed output folder (this module owns its format: `embed_source` writes ``embeddings.npy``,
`write_embed_meta` the rest, `load_embeddings` reads it back; ``geodino curate action=embed`` makes one) holds

- ``embeddings.npy``: (N, d) float32, row i the embedding of item i;
- ``items.txt``: the items, a chip list (raster sources) or a file list (image folders), formats in
  geodino.data.lists;
- ``embed.json``: what was embedded and how (``kind``, data name, bands, backbone, normalisation, ...);
- ``chips.parquet`` (raster sources and chip stores, with geopandas installed: ``pip install geodino[vector]``): a
  GeoParquet file, one row per chip: ``row`` (its row in ``embeddings.npy``), ``chip`` (its entry in ``items.txt``),
  ``file`` (the raster it was read from), ``valid_fraction`` and ``geometry``, the chip's footprint. A raster source
  reads every chip on one grid, the CRS of its first raster (torchgeo warps rasters in other CRSs onto it), so the
  footprints are the exact chip windows in that one CRS, which the GeoParquet metadata records. (Footprints in
  several CRSs, which no geodino source produces, would be reprojected to EPSG:4326 with each chip's own CRS in a
  ``crs`` column.) ``geopandas.read_parquet(...)`` reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from geodino.data.lists import read_chip_list, read_file_list, write_chip_list, write_file_list
from geodino.errors import DataError
from geodino.outputs import atomic_output, atomic_write_text

EMBEDDINGS_FILE = "embeddings.npy"
ITEMS_FILE = "items.txt"
META_FILE = "embed.json"
FOOTPRINTS_FILE = "chips.parquet"
CHIP_KINDS = ("raster", "chips")  # sources whose items are chips (a chip list in items.txt, footprints)

log = logging.getLogger("geodino")


class _EmbedView:
    """source[indices[j]] resized to a square `size` (short side, centre crop) when needed."""

    def __init__(self, source, indices, size: int | None, patch: int, footprints: bool = False):
        self.source, self.indices, self.size, self.patch = source, indices, size, patch
        self.footprints = footprints

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j: int):
        if self.footprints:  # (image, footprint) from one read
            img, fp = self.source.item_with_footprint(int(self.indices[j]))
            return self._sized(img), fp
        return self._sized(self.source[int(self.indices[j])])

    def _sized(self, img):
        if not torch.is_tensor(img):
            img = img["image"] if isinstance(img, dict) else torch.as_tensor(img)
        img = img.float()
        h, w = img.shape[-2:]
        size = self.size
        if size is None:
            if h == w and h % self.patch == 0:
                return img
            size = max(self.patch, (min(h, w) // self.patch) * self.patch)
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            if (nh, nw) != (h, w):
                img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True,
                                    align_corners=False)[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            img = img[:, top:top + size, left:left + size]
        return img


def _stack_same_size(xs):
    if xs and isinstance(xs[0], tuple):  # (image, footprint) pairs
        return _stack_same_size([x[0] for x in xs]), [x[1] for x in xs]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes {sorted(shapes)[:3]}...: set image_size= to resize them to one size")
    return torch.stack(xs)


def embed_source(extractor, source, batch_size: int = 64, out_path: str | Path | None = None, progress: bool = False,
                 *, indices: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, image_size: int | None = None,
                 num_workers: int = 0, footprints: list | None = None) -> np.ndarray:
    """L2-normalised CLS embeddings of `source[i]` for i in `indices` (default: all), in order.

    With `out_path` the rows stream to a float32 ``.npy`` memmap (written under a temporary name and
    renamed when complete; removed if embedding fails) and the returned array is that file opened read-only with
    ``mmap_mode='r'``; otherwise an in-memory array. Images are normalised with `mean`/`std` and, if
    `image_size` is set (or sizes vary), resized (short side) and centre-cropped to a square.
    `extractor` is a frozen-feature extractor (geodino.models.extract.Extractor: ``token_stride`` and
    ``extractor(x) -> (cls, patches)`` on the CPU); it is passed in, never imported (data sits below models).
    `footprints`: a list to fill with one footprint dict per row, in order, read with the chip (sources with
    ``item_with_footprint``: raster sources and chip stores; see `write_footprints`).
    """
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise DataError("nothing to embed: the source is empty")
    patch = int(extractor.token_stride)
    if footprints is not None and not hasattr(source, "item_with_footprint"):
        raise DataError(f"a {type(source).__name__} has no chip footprints (only raster sources and chip stores do)")
    view = _EmbedView(source, indices, image_size, patch, footprints=footprints is not None)
    loader = torch.utils.data.DataLoader(view, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
                                         collate_fn=_stack_same_size)
    mean_t = None if mean is None else torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = None if std is None else torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    batches = tqdm(loader, desc="embedding", total=len(loader), disable=not progress)

    def fill(tmp: Path | None) -> np.ndarray:
        out, pos = None, 0
        for x in batches:
            if isinstance(x, tuple):
                x, fps = x
                footprints.extend(fps)
            if mean_t is not None:
                x = (x - mean_t) / std_t
            cls, _ = extractor(x)
            e = F.normalize(cls, dim=-1).numpy()
            if out is None:
                shape = (n, e.shape[1])
                out = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                       if tmp is not None else np.empty(shape, dtype=np.float32))
            out[pos:pos + len(e)] = e
            pos += len(e)
        return out

    if out_path is None:
        return fill(None)
    with atomic_output(out_path) as tmp:
        fill(tmp).flush()
    return np.load(out_path, mmap_mode="r")


def write_footprints(path: str | Path, footprints: Sequence[dict]) -> Path | None:
    """``chips.parquet`` (module doc): a GeoParquet file of `footprints` (dicts with ``chip``, ``file``, ``bounds``,
    ``crs``, ``valid_fraction``, as `embed_source` collects them), row i the footprint of embedding i; written
    atomically with geopandas. Without geopandas (or pyarrow) nothing is written and one warning says why: the
    embeddings do not need it. Returns the path written, or None."""
    try:
        import geopandas as gpd
        import pyarrow  # noqa: F401 -- geopandas writes Parquet through it
        from shapely.geometry import box
    except ImportError as e:
        log.warning("no %s (chip footprints) written: %s is not installed; pip install 'geodino[vector]'",
                    Path(path).name, e.name or "geopandas")
        return None
    if not footprints:
        raise DataError("no chip footprints to write")
    frame = {"row": np.arange(len(footprints), dtype=np.int64),
             "chip": np.asarray([int(f["chip"]) for f in footprints], dtype=np.int64),
             "file": [str(f.get("file") or "") for f in footprints],
             "valid_fraction": np.asarray([float(f.get("valid_fraction", np.nan)) for f in footprints], np.float64)}
    geometry = [box(*f["bounds"]) for f in footprints]
    crss = [f.get("crs") for f in footprints]
    if len(set(crss)) == 1:  # one grid (every geodino source): exact footprints in its CRS
        gdf = gpd.GeoDataFrame(frame, geometry=geometry, crs=crss[0])
    else:  # footprints in several CRSs: EPSG:4326, with each chip's own CRS in a column
        import pandas as pd

        frame["crs"] = [str(c) for c in crss]
        table = pd.DataFrame(frame)
        parts = []
        for c in dict.fromkeys(crss):
            sel = [i for i, x in enumerate(crss) if x == c]
            parts.append(gpd.GeoDataFrame(table.iloc[sel], geometry=[geometry[i] for i in sel], crs=c)
                         .to_crs("EPSG:4326"))
        gdf = gpd.GeoDataFrame(pd.concat(parts).sort_values("row"), crs="EPSG:4326")
    with atomic_output(path) as tmp:
        gdf.to_parquet(tmp, index=False)
    return Path(path)


def write_embed_meta(out_dir: str | Path, doc: dict, *, chips: Sequence[int] | None = None,
                     chip_header: dict | None = None, files: Sequence[str | Path] | None = None,
                     file_header: str = "") -> Path:
    """Complete an embed output folder beside its ``embeddings.npy``: ``items.txt``, a chip list of `chips` (with
    `chip_header`; `doc` must then say ``kind: raster``) or a file list of `files`, and ``embed.json`` (`doc`)."""
    out_dir = Path(out_dir)
    if (chips is None) == (files is None):
        raise ValueError("an embed output lists either chips (raster sources) or files (image folders)")
    if chips is not None:
        if doc.get("kind") not in CHIP_KINDS:
            raise ValueError(f"an embed output with a chip list needs kind 'raster' or 'chips' in embed.json, "
                             f"got {doc.get('kind')!r}")
        write_chip_list(out_dir / ITEMS_FILE, chips, dict(chip_header or {}))
    else:
        write_file_list(out_dir / ITEMS_FILE, files, header=file_header)
    atomic_write_text(out_dir / META_FILE, json.dumps(doc, indent=2))
    return out_dir


def load_embeddings(path: str | Path) -> tuple[np.ndarray, dict, list[str] | None, np.ndarray | None]:
    """(embeddings memmap, embed.json dict, file list or None, chip indices or None) of an embed output
    folder, or of a bare ``.npy`` file (then no items)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        npy = path / EMBEDDINGS_FILE
        if not npy.is_file():
            raise DataError(f"{path} holds no {EMBEDDINGS_FILE}; run `geodino curate action=embed out={path}` first")
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        files = chips = None
        items = path / ITEMS_FILE
        if items.is_file():
            if meta.get("kind") in CHIP_KINDS:
                chips, header = read_chip_list(items)
                meta = {**header, **meta}
            else:
                files = [str(f) for f in read_file_list(items)]
        return np.load(npy, mmap_mode="r"), meta, files, chips
    if path.suffix == ".npy" and path.is_file():
        return np.load(path, mmap_mode="r"), {}, None, None
    raise DataError(f"embeddings '{path}' is neither an embed output folder nor a .npy file")
