"""GEO-Bench v1 on disk: task discovery, partitions, band statistics and per-sample HDF5 reading.

geodino's own reader, no ``geobench`` dependency (docs/eo_data.md §3). Layout under ``root=`` — any of: the GEO-Bench
folder holding ``classification_v1.0`` / ``segmentation_v1.0``, one of those folders, or a single task folder::

    <task>/task_specs.pkl                 pickled TaskSpecifications (label type, class count, bands)
    <task>/<partition>_partition.json     {"train": [...], "valid": [...], "test": [...]} sample names
    <task>/band_stats.json                {band: {min, max, mean, std, median, percentile_*}}
    <task>/<sample>.hdf5                  one 2-D dataset per band (keyed by band name, "_<date>" appended
                                          when dated), "label" dataset for segmentation, file attribute
                                          "pickle" = str(pickle.dumps(attr_dict)) with per-band info,
                                          "bands_order" and (classification) "label"

Every pickle (``task_specs.pkl``, the ``pickle`` attribute) goes through
`geodino.eval.datasets.safe_pickle` — an allow-list unpickler — never ``pickle.load``.

`GeobenchTask.read` returns one sample: the chosen bands (``rgb``: the red, green and blue bands found by
`geodino.data.bands.rgb_indices` on band names and alternative names; ``all``: every same-resolution 2-D band)
scaled to [0, 1] per band with ``band_stats.json`` (``minmax``: min/max, ``percentile``: 1st/99th percentile;
``none``: divide by 255), and the label (class index, 0/1 vector or [H, W] mask), checked against the class count.
Channel-order fixes: in m-eurosat and m-brick-kiln the stored band names are wrong; the reader assigns the true
band to each stored position (eurosat B01..B08, B09, B10, B11, B12, B8A; brick-kiln B01..B05, B07, B8A, B08, B11,
B12, TCI R, G, B), so RGB is B04/B03/B02. `GeobenchTiles` serves a segmentation split as a dense tile set
(geodino.eval.dense).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from geodino.data.bands import missing_rgb, rgb_indices
from geodino.errors import DataError, GeodinoError
from geodino.eval.datasets.safe_pickle import decode_attr_pickle, safe_load_file

BENCHMARKS = ("classification_v1.0", "segmentation_v1.0")
# True band at each stored image-band position (geobench 1.1.0 README, issues #28/#29).
CHANNEL_FIXES = {
    "m-eurosat": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"],
    "m-brick-kiln": ["B01", "B02", "B03", "B04", "B05", "B07", "B8A", "B08", "B11", "B12", "TCI_R", "TCI_G", "TCI_B"],
}
STATS_KEYS = {"minmax": ("min", "max"), "percentile": ("percentile_1", "percentile_99")}


def _attr(obj: Any, *names: str, default=None):
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, "__dict__") and n in getattr(obj, "__dict__", {}):
            return obj.__dict__[n]
    return default


@dataclass
class BandRef:
    descriptor: str      # dataset key in the HDF5 file
    name: str            # band name (true name after a channel-order fix)
    stored_name: str     # name the file / band_stats use
    alt_names: tuple


class GeobenchTask:
    """One task folder: its specs (kind, class count and names), a partition's split lists, band statistics, and
    `read` for one sample."""

    def __init__(self, path: Path, partition: str = "default"):
        self.path = Path(path)
        self.name = self.path.name
        specs_file = self.path / "task_specs.pkl"
        if not specs_file.is_file():
            raise DataError(f"{self.path}: no task_specs.pkl (not a GEO-Bench v1 task folder)")
        self.specs = safe_load_file(specs_file)
        label_type = _attr(self.specs, "label_type")
        if label_type is None:
            raise DataError(f"{specs_file}: TaskSpecifications has no label_type")
        cls_name = getattr(label_type, "class_name", type(label_type).__name__)
        if cls_name in ("SegmentationClasses", "SemanticSegmentation"):
            self.kind = "seg"
        elif cls_name == "MultiLabelClassification":
            self.kind = "multilabel"
        elif cls_name == "Classification":
            self.kind = "cls"
        else:
            raise DataError(f"{specs_file}: unsupported label type '{cls_name}' (classification, multilabel or segmentation)")
        try:
            self.n_classes = int(_attr(label_type, "n_classes"))
        except (TypeError, ValueError):
            raise DataError(f"{specs_file}: label type {cls_name} has no n_classes") from None
        names = _attr(label_type, "_class_names", "class_names", "class_name")
        self.class_names = [str(c) for c in names] if names and len(names) == self.n_classes else \
            [str(i) for i in range(self.n_classes)]
        part_file = self.path / f"{partition}_partition.json"
        if not part_file.is_file():
            avail = sorted(p.name.replace("_partition.json", "") for p in self.path.glob("*_partition.json"))
            raise DataError(f"{part_file} not found; partitions here: {', '.join(avail) or 'none'}")
        try:
            self.partition = json.loads(part_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{part_file}: not valid JSON ({e})") from None
        for split in ("train", "valid", "test"):
            if not isinstance(self.partition.get(split), list):
                raise DataError(f"{part_file}: no '{split}' list of sample names")
        self.partition_name = partition
        stats_file = self.path / "band_stats.json"
        self.stats_file = stats_file
        self.band_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None

    def sample_file(self, name: str) -> Path:
        return self.path / f"{name}.hdf5"

    def names(self, split: str, limit: int | None = None) -> list[str]:
        names = list(self.partition[split])
        return names[: int(limit)] if limit else names

    # -- bands ----------------------------------------------------------------------------------
    def image_bands(self, attr: dict, file: Path) -> list[BandRef]:
        order = attr.get("bands_order")
        if not isinstance(order, (list, tuple)):
            raise DataError(f"{file}: pickled attributes have no bands_order list")
        refs = []
        for d in order:
            if str(d) == "label" or str(d).startswith("label_"):
                continue
            info = _attr(attr.get(d, {}), "band_info")
            # without band info, the descriptor minus its "_<date>" suffix is the band name
            name = str(_attr(info, "name", default=None) or re.sub(r"_\d{4}-?\d{2}-?\d{2}.*$", "", str(d)))
            alts = tuple(str(a) for a in (_attr(info, "alt_names", default=()) or ()))
            refs.append(BandRef(str(d), name, name, alts))
        if self.name in CHANNEL_FIXES:
            fix = CHANNEL_FIXES[self.name]
            if len(refs) != len(fix):
                raise DataError(f"{file}: {self.name} should hold {len(fix)} bands (channel-order fix) but has {len(refs)}")
            refs = [BandRef(r.descriptor, true, r.stored_name, (true,)) for r, true in zip(refs, fix)]
        return refs

    def select(self, refs: list[BandRef], mode: str, file: Path) -> list[BandRef]:
        if mode == "all":
            return refs
        if mode != "rgb":
            raise GeodinoError(f"bands={mode}: choose rgb or all")
        # a band is red / green / blue when its name or one of its alternative names says so (after a
        # channel-order fix both are the true band name, so B04 / B03 / B02 are picked)
        names = [(r.name, *r.alt_names) for r in refs]
        rgb = rgb_indices(names)
        if rgb is None:
            raise DataError(f"{file}: no {missing_rgb(names)[0]} band among {', '.join(r.name for r in refs)} (bands=rgb)")
        return [refs[i] for i in rgb]

    def scale(self, data: np.ndarray, ref: BandRef, mode: str) -> np.ndarray:
        if mode == "none":
            return data.astype(np.float32) / 255.0
        if mode not in STATS_KEYS:
            raise GeodinoError(f"scaling={mode}: choose minmax, percentile or none")
        if self.band_stats is None:
            raise DataError(f"{self.stats_file} not found (needed for scaling={mode})")
        st = self.band_stats.get(ref.stored_name) or self.band_stats.get(ref.descriptor)
        lo_k, hi_k = STATS_KEYS[mode]
        if not isinstance(st, dict) or lo_k not in st or hi_k not in st:
            raise DataError(f"{self.stats_file}: no {lo_k}/{hi_k} for band '{ref.stored_name}'")
        lo, hi = float(st[lo_k]), float(st[hi_k])
        return np.clip((data.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)

    # -- samples --------------------------------------------------------------------------------
    def read(self, name: str, band_mode: str, scaling: str) -> tuple[torch.Tensor, Any, list[str]]:
        """(image [C, H, W] in [0, 1], label (int | 0/1 array | [H, W] array), band names)."""
        file = self.sample_file(name)
        if not file.is_file():
            raise DataError(f"{file}: sample '{name}' listed in {self.partition_name}_partition.json is missing")
        try:
            f = h5py.File(file, "r")
        except OSError as e:
            raise DataError(f"{file}: not a readable HDF5 file ({e})") from None
        with f:
            if "pickle" not in f.attrs:
                raise DataError(f"{file}: no 'pickle' attribute (not a GEO-Bench v1 sample)")
            attr = decode_attr_pickle(f.attrs["pickle"], str(file))
            if not isinstance(attr, dict):
                raise DataError(f"{file}: pickled attributes are a {type(attr).__name__}, expected a dict")
            refs = self.select(self.image_bands(attr, file), band_mode, file)
            planes, names, shape = [], [], None
            for r in refs:
                if r.descriptor not in f:
                    raise DataError(f"{file}: band '{r.descriptor}' is listed in bands_order but the file has no such "
                                    f"dataset (datasets: {', '.join(sorted(f.keys()))})")
                data = np.asarray(f[r.descriptor])
                if data.ndim != 2:
                    if band_mode == "all":
                        continue  # multi-band cubes (e.g. NeonTree hyperspectral) are not stacked
                    raise DataError(f"{file}: band '{r.descriptor}' has shape {data.shape}, expected 2-D")
                if shape is None:
                    shape = data.shape
                elif data.shape != shape:
                    if band_mode == "all":
                        continue  # other resolutions (NeonTree 40x40 CHM) are left out
                    raise DataError(f"{file}: band '{r.descriptor}' is {data.shape}, other bands {shape}")
                planes.append(self.scale(data, r, scaling))
                names.append(r.name)
            image = torch.from_numpy(np.stack(planes))
            if self.kind == "seg":
                if "label" not in f:
                    raise DataError(f"{file}: segmentation sample without a 'label' dataset")
                label = np.asarray(f["label"])
                if label.ndim == 3 and label.shape[-1] == 1:
                    label = label[..., 0]
                if label.shape != image.shape[1:]:
                    raise DataError(f"{file}: label is {label.shape} but the bands are {tuple(image.shape[1:])}")
                bad = np.unique(label[(label < 0) | (label >= self.n_classes)])
                if bad.size:
                    raise DataError(f"{file}: label value(s) {', '.join(map(str, bad[:5]))} outside 0..{self.n_classes - 1} "
                                    f"({self.n_classes} classes in task_specs.pkl)")
                label = label.astype(np.int64)
            else:
                label = attr.get("label")
                label = self._check_label(label, file)
        return image, label, names

    def _check_label(self, label, file: Path):
        if label is None:
            raise DataError(f"{file}: no 'label' in the pickled attributes")
        if self.kind == "multilabel":
            arr = np.asarray(label).reshape(-1)
            if arr.size != self.n_classes or not np.isin(arr, (0, 1)).all():
                raise DataError(f"{file}: multilabel label {arr.tolist()[:8]} is not a 0/1 vector of {self.n_classes}")
            return arr.astype(np.float32)
        try:
            v = int(np.asarray(label).reshape(-1)[0]) if np.ndim(label) else int(label)
        except (TypeError, ValueError, IndexError):
            raise DataError(f"{file}: label {label!r} is not a class index") from None
        if not 0 <= v < self.n_classes:
            raise DataError(f"{file}: label {v} outside 0..{self.n_classes - 1} ({self.n_classes} classes in task_specs.pkl)")
        return v


def find_tasks(root: Path, which) -> list[Path]:
    root = Path(root)
    if (root / "task_specs.pkl").is_file():
        found = [root]
    else:
        dirs = [root, *(root / b for b in BENCHMARKS)]
        found = []
        for d in dirs:
            if d.is_dir():
                found += sorted(p for p in d.iterdir() if p.is_dir() and (p / "task_specs.pkl").is_file())
    if not found:
        raise DataError(f"no GEO-Bench v1 task under {root} (expected <root>/{{classification_v1.0,segmentation_v1.0}}/"
                        f"<task>/task_specs.pkl)")
    if which in (None, "all") or which == ["all"]:
        return found
    wanted = [which] if isinstance(which, str) else list(which)
    by_name = {p.name: p for p in found}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise DataError(f"GEO-Bench task(s) {', '.join(missing)} not under {root}; available: {', '.join(sorted(by_name))}")
    return [by_name[w] for w in wanted]


class GeobenchTiles:
    """Segmentation samples of one split as a dense tile set (geodino.eval.dense.TileSet)."""

    def __init__(self, task: GeobenchTask, names: Sequence[str], band_mode: str, scaling: str):
        self.task, self.list, self.band_mode, self.scaling = task, list(names), band_mode, scaling
        if not self.list:
            raise DataError(f"{task.path}: empty split")

    def __len__(self) -> int:
        return len(self.list)

    def size(self, i: int) -> tuple[int, int]:
        file = self.task.sample_file(self.list[i])
        try:
            with h5py.File(file, "r") as f:
                if "label" not in f:
                    raise DataError(f"{file}: segmentation sample without a 'label' dataset")
                return tuple(int(s) for s in f["label"].shape[:2])
        except OSError as e:
            raise DataError(f"{file}: not a readable HDF5 file ({e})") from None

    def load(self, i: int) -> dict:
        image, label, _ = self.task.read(self.list[i], self.band_mode, self.scaling)
        return {"image": image, "target": torch.from_numpy(label), "name": self.list[i], "group": ""}
