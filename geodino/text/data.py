"""Image–caption pairs for dino.txt training (``data=captions caption_file=<csv|jsonl>``).

Caption files:

* ``.csv`` / ``.tsv`` -- a header naming the image column (``path``, ``image``, ``file`` or ``filename``) and the
  caption column (``caption`` or ``text``), or two columns ``path,caption`` without a header;
* ``.jsonl`` -- one object per line with the same keys; ``caption`` may be a list (one is drawn per sample).

Relative paths are resolved against ``root`` (default: the caption file's folder). Images are photos (jpg, png,
... read as RGB / 255) or GeoTIFFs of any band count (scaled like geodino.data.sources.raster: digital numbers /
``scale``, clipped to [0, 1]; ``scale`` null means the data type's default, geodino.data.geotiff). Every image of one
caption file must have the same band count. Nodata pixels (all bands equal to the file's nodata value) become 0
after normalisation (the band mean).

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
import rasterio
import torch
import torch.nn.functional as F

from geodino.data.bands import select_bands
from geodino.data.geotiff import band_names, default_scale, raster_bands, valid_mask
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
    """Item ``i`` -> ``{"image": (C, H, W) float in [0, 1] (NaN at nodata), "captions": [...]}``."""

    def __init__(self, pairs: Sequence[CaptionPair], bands: Sequence[str] | None = None, scale: float | None = None,
                 length: int | None = None):
        self.pairs = list(pairs)
        if not self.pairs:
            raise DataError("no image–caption pairs")
        self.scale = None if scale is None else float(scale)
        self.length = len(self.pairs) if length is None else int(length)
        first = self.pairs[0].path
        if first.suffix.lower() in RASTER_SUFFIXES:
            names, _ = raster_bands(first)
            if bands is not None:
                self.band_idx = select_bands(names, list(bands), where=str(first))
                self.band_names = [names[i] for i in self.band_idx]
            else:
                self.band_idx = list(range(len(names)))
                self.band_names = names
        else:
            if bands is not None and list(bands) != ["R", "G", "B"]:
                raise DataError(f"data.bands={list(bands)} but {first} is a photo (R, G, B)")
            self.band_idx = [0, 1, 2]
            self.band_names = ["R", "G", "B"]

    @property
    def n_bands(self) -> int:
        return len(self.band_names)

    def __len__(self) -> int:
        return self.length

    def read(self, path: Path) -> torch.Tensor:
        if path.suffix.lower() in RASTER_SUFFIXES:
            try:
                with rasterio.open(path) as src:
                    names = band_names(src)
                    generic = all(n == f"band_{i + 1}" for i, n in enumerate(names))
                    if generic and len(names) == self.n_bands and not all(b in names for b in self.band_names):
                        names = list(self.band_names)  # no band descriptions: bands in file order
                    if not all(b in names for b in self.band_names):
                        raise DataError(f"{path} has bands {', '.join(names)}; the caption data uses "
                                        f"{', '.join(self.band_names)} (every image needs the same bands)")
                    idx = [names.index(b) for b in self.band_names]
                    arr = src.read([i + 1 for i in idx])
                    nodata = src.nodata
                    scale = self.scale if self.scale is not None else default_scale(arr.dtype)
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"cannot read raster {path}: {e}") from e
            bad = ~valid_mask(arr, nodata)
            x = np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)
            x[:, bad] = np.nan
            return torch.from_numpy(x)
        if self.n_bands != 3:
            raise DataError(f"{path} is a photo (R, G, B) but the caption data has {self.n_bands} bands")

        return read_photo(path)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[int(i) % len(self.pairs)]
        return {"image": self.read(pair.path), "captions": pair.captions}


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
