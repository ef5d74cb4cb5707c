"""Natural-image folders: jpg / png / tif, nested, with an optional file list.

Unreadable or too-small images are skipped and counted, with the file name in the log; they are
never replaced by zeros. Images are returned as float32 RGB tensors (3, H, W) in [0, 1].
Index `i` maps to file `i % n_files`, so a source can be longer than its folder (epochs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from geodino.data.lists import read_file_list
from geodino.errors import DataError

log = logging.getLogger("geodino")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


def list_images(paths: Sequence[str | Path], file_list: str | Path | None = None) -> list[Path]:
    files: list[Path] = []
    if file_list is not None:
        files = read_file_list(file_list, base=Path(paths[0]) if paths else None)
    else:
        for p in paths:
            p = Path(p).expanduser()
            if p.is_file():
                files.append(p)
            elif p.is_dir():
                files.extend(sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_SUFFIXES))
            else:
                raise DataError(f"data path {p} does not exist")
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, paths))}")
    return files


class FolderSource(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str | Path], file_list: str | Path | None = None, min_size: int = 32,
                 length: int | None = None, validate: bool = True):
        self.files = list_images(paths, file_list)
        self.min_size = int(min_size)
        self.skipped: dict[str, str] = {}
        if validate:
            self.files = [f for f in self.files if self._check(f)]
            if self.skipped:
                log.warning("skipped %d unreadable or too-small images (see run.log)", len(self.skipped))
            if not self.files:
                raise DataError(f"every image under {', '.join(map(str, paths))} was unreadable or smaller than {min_size} px")
        self.length = len(self.files) if length is None else int(length)
        self.band_names = ["R", "G", "B"]

    @property
    def n_bands(self) -> int:
        return 3

    def _check(self, path: Path) -> bool:
        try:
            with Image.open(path) as im:
                w, h = im.size
                im.verify()
        except Exception as e:
            self.skipped[str(path)] = f"unreadable: {type(e).__name__}: {e}"
            log.info("skip %s: unreadable (%s)", path, e)
            return False
        if min(w, h) < self.min_size:
            self.skipped[str(path)] = f"too small: {w}x{h} < {self.min_size}"
            log.info("skip %s: %dx%d is smaller than min_size %d", path, w, h, self.min_size)
            return False
        return True

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return read_photo(self.files[int(index) % len(self.files)])

    def preview(self, size: int = 160, multiple: int = 16) -> torch.Tensor:
        """The first image resized to (3, S, S), S the largest multiple of `multiple` <= `size`, for figures."""
        side = size - size % multiple
        img = self[0]
        return torch.nn.functional.interpolate(img[None], size=(side, side), mode="bilinear", antialias=True)[0]


def read_photo(path: str | Path) -> torch.Tensor:
    """An image file as a float32 RGB tensor (3, H, W) in [0, 1]; a clear error names a bad file."""

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
