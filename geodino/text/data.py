"""Image–caption pairs for dino.txt training (``data=captions caption_file=<csv|jsonl>``).

Caption files:

* ``.csv`` / ``.tsv`` -- a header naming the image column (``path``, ``image``, ``file`` or ``filename``) and the
  caption column (``caption`` or ``text``), or two columns ``path,caption`` without a header;
* ``.jsonl`` -- one object per line with the same keys; ``caption`` may be a list (one is drawn per sample).

Relative paths are resolved against ``root`` (default: the caption file's folder). Images are photos (jpg, png,
... read as RGB / 255) or GeoTIFFs of any band count (geodino.data.geotiff.read_scaled, as segmentation reads them:
``clip((DN + offset) / scale, 0, 1)``; ``scale`` null means the data type's default). Every image is mapped by band
name onto one band list -- the frozen backbone's contract when it has one, else the first image's bands -- so files
that store the same bands in another order (``B02, B03, B04`` vs ``B04, B03, B02``) give the same inputs; a file
whose bands cannot be mapped is refused with its path and bands. Nodata pixels (all bands equal to the file's nodata
value) become 0 after normalisation (the band mean). Decoded images are cached after their first read.

Samples are addressed by index (item ``i`` is pair ``i % n``) and each sample's augmentation draws from a generator
seeded by (seed, i), so the trainer's exact resume holds (see geodino.train.loop).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from geodino.data.geotiff import pick_bands, raster_bands, read_scaled
from geodino.data.sources.folder import read_photo
from geodino.data.stats import band_statistics
from geodino.errors import DataError
from geodino.text.dinotxt import get_tokenizer

log = logging.getLogger("geodino")

RASTER_SUFFIXES = {".tif", ".tiff"}
_PATH_KEYS = ("path", "image", "file", "filename", "image_path")
_CAPTION_KEYS = ("caption", "captions", "text")


@dataclass
class CaptionPair:
    path: Path
    captions: list[str]


def _pick(row: dict, keys: Sequence[str], what: str, where: str):
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    for k in keys:
        if k in lower and lower[k] not in (None, ""):
            return lower[k]
    raise DataError(f"{where}: no {what} column (expected one of {', '.join(keys)}; found {', '.join(map(str, row))})")


def read_caption_file(path: str | Path, root: str | Path | None = None, check_files: bool = True) -> list[CaptionPair]:
    """The (image path, captions) pairs of a csv / tsv / jsonl caption file."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    base = Path(str(root)).expanduser() if root else path.parent
    suffix = path.suffix.lower()
    raw: list[tuple[str, object, str]] = []  # (image, caption(s), where)
    if suffix in (".jsonl", ".json"):
        lines = path.read_text().splitlines()
        if suffix == ".json":
            try:
                rows = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON: {e}") from e
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json caption file must hold a list of objects")
            lines = [json.dumps(r) for r in rows]
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON object ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object with path and caption")
            raw.append((str(_pick(row, _PATH_KEYS, "image path", where)), _pick(row, _CAPTION_KEYS, "caption", where), where))
    elif suffix in (".csv", ".tsv", ".txt"):
        delim = "\t" if suffix == ".tsv" else ","
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f, delimiter=delim) if r and any(c.strip() for c in r)]
        if not rows:
            raise DataError(f"caption file {path} is empty")
        header = [c.strip().lower() for c in rows[0]]
        if any(k in header for k in _PATH_KEYS) and any(k in header for k in _CAPTION_KEYS):
            for i, r in enumerate(rows[1:], 2):
                where = f"{path}:{i}"
                row = dict(zip(header, r))
                raw.append((str(_pick(row, _PATH_KEYS, "image path", where)), _pick(row, _CAPTION_KEYS, "caption", where), where))
        else:
            for i, r in enumerate(rows, 1):
                if len(r) < 2:
                    raise DataError(f"{path}:{i}: expected 'path,caption' (or a header with path and caption columns)")
                raw.append((r[0].strip(), delim.join(r[1:]), f"{path}:{i}"))
    else:
        raise DataError(f"caption file {path}: use .csv, .tsv or .jsonl (got '{path.suffix}')")

    pairs, missing = [], []
    for image, caps, where in raw:
        caps = [caps] if isinstance(caps, str) else list(caps) if isinstance(caps, (list, tuple)) else None
        if caps is None:
            raise DataError(f"{where}: the caption must be a string or a list of strings")
        caps = [str(c).strip() for c in caps if str(c).strip()]
        if not caps:
            raise DataError(f"{where}: empty caption")
        p = Path(image).expanduser()
        p = p if p.is_absolute() else base / p
        if check_files and not p.is_file():
            missing.append(str(p))
        pairs.append(CaptionPair(p, caps))
    if missing:
        raise DataError(f"{len(missing)} image(s) listed in {path} do not exist (first: {', '.join(missing[:3])})")
    if not pairs:
        raise DataError(f"caption file {path} lists no image–caption pairs")
    return pairs


class CaptionSource(torch.utils.data.Dataset):
    """Item ``i`` -> ``{"image": (C, H, W) float in [0, 1] (NaN at nodata), "captions": [...]}``.

    ``bands``: the band list every image is mapped to, by name (geodino.data.geotiff.pick_bands, the segmenter's
    mapping: a file stored ``B02, B03, B04`` feeds an ``R, G, B`` model as ``B04, B03, B02``); None: the first
    image's bands (photos: R, G, B). An image whose bands cannot be mapped is refused with its path and bands.
    GeoTIFFs are scaled by geodino.data.geotiff.read_scaled (``scale`` / ``offset`` None: the data type's default
    and the product's offset, else ``fallback_offset``), as segmentation reads them.

    Decoded images are cached in memory after their first read (up to ``cache_mb``; 0 turns the cache off): caption
    chips are small and re-read every epoch. Each data-loader worker holds its own cache."""

    def __init__(self, pairs: Sequence[CaptionPair], bands: Sequence[str] | None = None, scale: float | None = None,
                 length: int | None = None, offset: float | None = None, fallback_offset: float = 0.0,
                 cache_mb: float = 512.0):
        self.pairs = list(pairs)
        if not self.pairs:
            raise DataError("no image–caption pairs")
        self.scale = None if scale is None else float(scale)
        self.offset = None if offset is None else float(offset)
        self.fallback_offset = float(fallback_offset or 0.0)
        self.length = len(self.pairs) if length is None else int(length)
        self.cache_bytes = int(float(cache_mb) * 2**20)
        self._cache: dict[Path, torch.Tensor] = {}
        self._cached = 0
        first = self.pairs[0].path
        if first.suffix.lower() in RASTER_SUFFIXES:
            names, _ = raster_bands(first)
        else:
            names = ["R", "G", "B"]
        if bands is None:
            self.band_names = list(names)
        else:
            self.band_names = [str(b) for b in bands]
            self.band_idx(names, first)  # fail early, naming the first file

    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    def band_idx(self, names: Sequence[str], path: Path) -> list[int]:
        """Positions of this source's bands among an image's `names` (the one mapping: pick_bands)."""
        return pick_bands(names, self.band_names, len(names), str(path))

    def __len__(self) -> int:
        return self.length

    def read(self, path: Path) -> torch.Tensor:
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        if path.suffix.lower() in RASTER_SUFFIXES:
            arr, valid, _ = read_scaled(path, self.band_names, self.scale, self.offset,
                                        fallback_offset=self.fallback_offset)
            x = torch.from_numpy(arr)
            x[:, torch.from_numpy(~valid)] = float("nan")
        else:
            x = read_photo(path)
            x = x[self.band_idx(["R", "G", "B"], path)]
        if self._cached + x.numel() * x.element_size() <= self.cache_bytes:
            self._cache[path] = x
            self._cached += x.numel() * x.element_size()
        return x

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[int(i) % len(self.pairs)]
        return {"image": self.read(pair.path), "captions": pair.captions}


def check_caption_bands(source: CaptionSource) -> dict[tuple[str, ...], list[int]]:
    """Map every image's bands onto ``source.band_names`` before training (raster headers only), so that an image
    that cannot be mapped is refused up front with its path and bands; returns {file band names: indices read}."""
    orders: dict[tuple[str, ...], list[int]] = {}
    for pair in source.pairs:
        names = raster_bands(pair.path)[0] if pair.path.suffix.lower() in RASTER_SUFFIXES else ["R", "G", "B"]
        if tuple(names) not in orders:
            orders[tuple(names)] = source.band_idx(names, pair.path)
    if len(orders) > 1:
        log.info("caption images store their bands in %d ways (%s); every one is read as %s", len(orders),
                 "; ".join(", ".join(k) for k in orders), ", ".join(source.band_names))
    return orders


def caption_band_statistics(source: CaptionSource, n: int = 64) -> tuple[list[float], list[float]]:
    """Per-band mean / std over (up to) ``n`` evenly spaced pairs, nodata excluded (geodino.data.stats)."""
    idx = np.unique(np.linspace(0, len(source.pairs) - 1, min(n, len(source.pairs))).round().astype(int))
    return band_statistics(source, indices=[int(i) for i in idx])


class CaptionAugment:
    """RandomResizedCrop(size, scale, ratio 3/4..4/3) + horizontal flip + (x - mean) / std; one caption drawn."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], scale: Sequence[float] = (0.5, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), horizontal_flips: bool = True):
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flips = bool(horizontal_flips)

    def _box(self, h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
        area = h * w
        for _ in range(10):
            u = torch.rand(2, generator=g).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ar = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[1])
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                return top, left, ch, cw
        side = min(h, w)  # fallback: centre crop
        return (h - side) // 2, (w - side) // 2, side, side

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        img = sample["image"]
        if img.shape[0] != self.mean.shape[0]:
            raise DataError(f"image has {img.shape[0]} bands, the model takes {self.mean.shape[0]}")
        top, left, ch, cw = self._box(img.shape[1], img.shape[2], generator)
        crop = img[:, top:top + ch, left:left + cw]
        crop = F.interpolate(crop[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=(ch > self.size or cw > self.size))[0]
        if self.flips and bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        x = (crop - self.mean) / self.std
        x = torch.nan_to_num(x, nan=0.0)  # nodata -> the band mean
        caps = sample["captions"]
        cap = caps[int(torch.randint(0, len(caps), (1,), generator=generator))] if len(caps) > 1 else caps[0]
        return {"image": x, "caption": cap}


def caption_collate(context_length: int = 77):
    """samples -> {"images": [B, C, S, S], "tokens": [B, context_length]} (CLIP BPE, open_clip)."""

    tok = get_tokenizer(context_length)

    def collate(samples: list[dict], rng=None) -> dict:
        return {"images": torch.stack([s["image"] for s in samples]), "tokens": tok([s["caption"] for s in samples])}

    return collate
