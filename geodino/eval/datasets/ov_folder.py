"""A labelled folder for open-vocabulary segmentation scoring (``geodino eval ov root=<folder>``).

Format (plain GeoTIFF, readable with rasterio only)::

    <root>/classes.txt          the class names, one per line: line i names label value i (blank lines and lines
                                starting with # are skipped); or classes.json: a list of names (value = position)
                                or a mapping {"<value>": "<name>"} with values 0..K-1
    <root>/images/<stem>.tif    an image of any band count; its bands are mapped onto the model's by name (band
                                descriptions), as `geodino segment` maps them
    <root>/labels/<stem>.tif    1 band, integer class values 0..K-1 on the image's grid (same height x width);
                                the file's nodata value and ``ignore_index`` (default 255) are not scored

A label value outside 0..K-1 (other than the ignored ones), an image without a label raster, or a label raster of
another size raise a `DataError` naming the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

from geodino.errors import DataError

IMAGE_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class LabelledImage:
    stem: str
    image: Path
    label: Path


def read_class_names(root: Path) -> list[str]:
    """The class names of a labelled folder (module doc): index = label value."""
    txt, js = root / "classes.txt", root / "classes.json"
    if txt.is_file():
        names = [ln.strip() for ln in txt.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    elif js.is_file():
        try:
            raw = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{js} is not valid JSON: {e}") from e
        if isinstance(raw, list):
            names = [str(n).strip() for n in raw]
        elif isinstance(raw, dict):
            try:
                by_value = {int(k): str(v).strip() for k, v in raw.items()}
            except ValueError:
                raise DataError(f"{js}: the keys of a class mapping are label values (0, 1, ...)") from None
            if sorted(by_value) != list(range(len(by_value))):
                raise DataError(f"{js}: label values must be 0..{len(by_value) - 1}, got {sorted(by_value)}")
            names = [by_value[i] for i in range(len(by_value))]
        else:
            raise DataError(f"{js}: expected a list of class names or a mapping value -> name")
    else:
        raise DataError(f"{root} has no classes.txt or classes.json naming the label values")
    if len(names) < 2:
        raise DataError(f"{txt if txt.is_file() else js}: open-vocabulary scoring needs at least 2 classes, got {names}")
    if len(set(names)) != len(names) or any(not n for n in names):
        raise DataError(f"{txt if txt.is_file() else js}: class names must be distinct and non-empty, got {names}")
    return names


def find_pairs(root: Path) -> list[LabelledImage]:
    """(stem, image, label raster) for every image under ``<root>/images``."""
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DataError(f"{root} needs images/ and labels/ folders (see geodino.eval.datasets.ov_folder)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir} holds no GeoTIFF (.tif / .tiff)")
    pairs, missing = [], []
    for img in images:
        label = next((labels_dir / f"{img.stem}{s}" for s in IMAGE_SUFFIXES if (labels_dir / f"{img.stem}{s}").is_file()),
                     None)
        if label is None:
            missing.append(img.name)
        else:
            pairs.append(LabelledImage(img.stem, img, label))
    if missing:
        raise DataError(f"{len(missing)} image(s) in {images_dir} have no label raster in {labels_dir} "
                        f"(first: {', '.join(missing[:3])})")
    return pairs


def read_labels(item: LabelledImage, n_classes: int, shape: tuple[int, int], ignore_index: int | None = 255) -> np.ndarray:
    """(H, W) int64 class values, -1 where not scored (the label file's nodata, ``ignore_index``)."""
    try:
        with rasterio.open(item.label) as src:
            if src.count != 1:
                raise DataError(f"label raster {item.label} has {src.count} bands; expected 1")
            lab = src.read(1)
            nodata = src.nodata
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read label raster {item.label}: {e}") from e
    if lab.shape != tuple(shape):
        raise DataError(f"label raster {item.label} is {lab.shape[0]} x {lab.shape[1]} but image {item.image} is "
                        f"{shape[0]} x {shape[1]}")
    if np.issubdtype(lab.dtype, np.floating):
        bad = ~np.isfinite(lab)
        lab = np.where(bad, -1, lab)
    out = lab.astype(np.int64)
    skip = np.zeros(out.shape, bool)
    if nodata is not None and np.isfinite(nodata):
        skip |= out == int(nodata)
    if ignore_index is not None:
        skip |= out == int(ignore_index)
    if np.issubdtype(lab.dtype, np.floating):
        skip |= bad
    wrong = ~skip & ((out < 0) | (out >= n_classes))
    if wrong.any():
        values = sorted({int(v) for v in np.unique(out[wrong])[:5]})
        raise DataError(f"label raster {item.label} holds values {values} outside the {n_classes} classes 0..{n_classes - 1} "
                        f"(set ignore_index or the file's nodata for unlabelled pixels)")
    out[skip] = -1
    return out
