"""Item lists: the one owner of the chip-list and file-list formats that `geodino curate` writes and `data=` sources
read (``data.chip_list=<file>`` for raster sources, ``data.file_list=<file>`` for image folders).

- **file list**: one image path per line (absolute, or relative to the first data path), ``#`` comments allowed.
- **chip list**: ``# key: value`` header lines (``format``, ``seed``, ``chip_size``, ``bands``, ``files``; values are
  JSON) then one chip index per line. Chip ``i`` is the chip ``RasterSource(seed=seed, chip_size=chip_size)`` draws
  for index ``i`` on the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from geodino.errors import DataError
from geodino.outputs import atomic_write_text

CHIP_LIST_FORMAT = "geodino chip list v1"


def write_chip_list(path: str | Path, chips: Sequence[int], meta: dict) -> Path:
    """Write a chip list (format in the module doc)."""
    path = Path(path)
    lines = [f"# format: {CHIP_LIST_FORMAT}"]
    for k, v in meta.items():
        lines.append(f"# {k}: {json.dumps(v)}")
    lines.append("# one chip index per line; chip i is RasterSource(seed=seed, chip_size=chip_size)[i] on these files")
    lines.extend(str(int(c)) for c in chips)
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_chip_list(path: str | Path) -> tuple[np.ndarray, dict]:
    """(chip indices, header dict) of a chip list."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"chip list {path} does not exist")
    meta: dict = {}
    chips: list[int] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and key.strip() and " " not in key.strip():
                try:
                    meta[key.strip()] = json.loads(value.strip())
                except json.JSONDecodeError:
                    meta[key.strip()] = value.strip()
            continue
        try:
            chips.append(int(line))
        except ValueError:
            raise DataError(f"{path}:{n}: '{line}' is not a chip index (a chip list holds one integer per line)") from None
    if meta.get("format", CHIP_LIST_FORMAT) != CHIP_LIST_FORMAT:
        raise DataError(f"{path} is a '{meta['format']}' file, not a {CHIP_LIST_FORMAT}")
    if not chips:
        raise DataError(f"chip list {path} holds no chip index")
    return np.asarray(chips, dtype=np.int64), meta


def write_file_list(path: str | Path, files: Sequence[str | Path], header: str = "") -> Path:
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    lines.extend(str(Path(f).resolve()) for f in files)
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_file_list(path: str | Path, base: str | Path | None = None) -> list[Path]:
    """The image paths of a file list; relative entries are resolved against `base` (default: the list's folder)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise DataError(f"file list {path} does not exist")
    base = Path(base) if base is not None else path.parent
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() else base / p)
    return out
