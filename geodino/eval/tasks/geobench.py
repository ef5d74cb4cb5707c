"""GEO-Bench v1 classification and segmentation from the HDF5 layout, with geodino's own reader.

No ``geobench`` dependency (docs/eo_data.md §3). Layout under ``root=`` — any of: the GEO-Bench folder
holding ``classification_v1.0`` / ``segmentation_v1.0``, one of those folders, or a single task folder::

    <task>/task_specs.pkl                 pickled TaskSpecifications (label type, class count, bands)
    <task>/<partition>_partition.json     {"train": [...], "valid": [...], "test": [...]} sample names
    <task>/band_stats.json                {band: {min, max, mean, std, median, percentile_*}}
    <task>/<sample>.hdf5                  one 2-D dataset per band (keyed by band name, "_<date>" appended
                                          when dated), "label" dataset for segmentation, file attribute
                                          "pickle" = str(pickle.dumps(attr_dict)) with per-band info,
                                          "bands_order" and (classification) "label"

Every pickle (``task_specs.pkl``, the ``pickle`` attribute) goes through
`geodino.eval.safe_pickle` — an allow-list unpickler — never ``pickle.load``.

Protocol (DINOv3 on GEO-Bench): frozen backbone, RGB bands only (``bands=rgb``; ``bands=all`` feeds every
same-resolution band through an adapted first layer), each band mapped to [0, 1] with the dataset's
per-band min/max from ``band_stats.json`` then normalised with the backbone contract's mean/std, native
resolution (padded at the bottom/right to a multiple of the patch size). Classification: kNN (cosine,
k=20, T=0.07) and a linear probe (lr picked on ``valid``, refit on train+valid) on the CLS token,
top-1 accuracy or multilabel F1 (micro, threshold 0.5) on ``test``. Segmentation: a linear head (or
light decoder) on patch tokens, mIoU on ``test`` (m-cashew-plant: mean over classes 1..6).
Channel-order fixes: in m-eurosat and m-brick-kiln the stored band names are wrong; geodino assigns
the true band to each stored position (eurosat B01..B08, B09, B10, B11, B12, B8A; brick-kiln
B01..B05, B07, B8A, B08, B11, B12, TCI R, G, B) and selects B04/B03/B02 for RGB.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from geodino.data.bands import missing_rgb, rgb_indices
from geodino.errors import DataError, GeodinoError
from geodino.eval.safe_pickle import decode_attr_pickle, safe_load_file

log = logging.getLogger("geodino")

BENCHMARKS = ("classification_v1.0", "segmentation_v1.0")
# True band at each stored image-band position (geobench 1.1.0 README, issues #28/#29).
CHANNEL_FIXES = {
    "m-eurosat": ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"],
    "m-brick-kiln": ["B01", "B02", "B03", "B04", "B05", "B07", "B8A", "B08", "B11", "B12", "TCI_R", "TCI_G", "TCI_B"],
}
STATS_KEYS = {"minmax": ("min", "max"), "percentile": ("percentile_1", "percentile_99")}


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------

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
        import h5py

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


# ----------------------------------------------------------------------------------------------
# Tiles (segmentation) and feature extraction (classification)
# ----------------------------------------------------------------------------------------------

class GeobenchTiles:
    def __init__(self, task: GeobenchTask, names: Sequence[str], band_mode: str, scaling: str):
        self.task, self.list, self.band_mode, self.scaling = task, list(names), band_mode, scaling
        if not self.list:
            raise DataError(f"{task.path}: empty split")
        self._shape = None

    def __len__(self) -> int:
        return len(self.list)

    def size(self, i: int) -> tuple[int, int]:
        import h5py

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


def _files_id(task: GeobenchTask, names: Sequence[str]) -> str:
    from geodino.eval.features import files_identity

    return files_identity([task.sample_file(n) for n in names])


def classification_features(ctx, extractor, task: GeobenchTask, split: str, names: list[str], band_mode: str,
                            scaling: str, mean, std):
    from geodino.eval.features import normalize, pad_to, round_up
    from geodino.eval.probes import _progress

    key = ctx.cache.key(backbone=extractor.fingerprint,
                        dataset={"task": task.name, "root": str(task.path.resolve()), "partition": task.partition_name,
                                 "files": _files_id(task, names)},
                        split=split, transform={"bands": band_mode, "scaling": scaling, "mean": list(mean),
                                                "std": list(std), "n_last_layers": extractor.n_last_layers,
                                                "pad": "bottom-right to patch multiple"})
    fs = ctx.cache.get(ctx.task_name, f"{task.name}-{key}")
    if fs is None:
        writer = ctx.cache.writer(ctx.task_name, f"{task.name}-{key}")
        try:
            n = len(names)
            cls_arr = avg_arr = None
            labels = writer.array("labels", (n, task.n_classes) if task.kind == "multilabel" else (n,),
                                  np.float32 if task.kind == "multilabel" else np.int64)
            p = extractor.patch_size
            bs = int(ctx.task.batch_size)
            batch, lo = [], 0

            def flush(upto: int):
                nonlocal cls_arr, avg_arr, batch, lo
                if not batch:
                    return
                # group equal sizes (a task's samples normally all share one size)
                h = max(b.shape[-2] for b in batch)
                w = max(b.shape[-1] for b in batch)
                x = torch.stack([pad_to(b, round_up(h, p), round_up(w, p)) for b in batch])
                cls, patch = extractor(x)
                if cls_arr is None:
                    cls_arr = writer.array("cls", (n, cls.shape[1]), np.float32)
                    avg_arr = writer.array("avgpool", (n, patch.shape[1]), np.float32)
                cls_arr[lo:upto] = cls.numpy()
                avg_arr[lo:upto] = patch.mean((2, 3)).numpy()
                batch, lo = [], upto

            for i, name in enumerate(_progress(names, len(names), f"{task.name} {split}", ctx.progress)):
                image, label, _ = task.read(name, band_mode, scaling)
                if batch and image.shape[-2:] != batch[0].shape[-2:]:
                    flush(i)
                batch.append(normalize(image, mean, std))
                labels[i] = label
                if len(batch) >= bs:
                    flush(i + 1)
            flush(len(names))
            fs = writer.finish({"n": n, "names": list(names), "kind": task.kind})
        except BaseException:
            writer.abort()
            raise
    ctx.note_cache(f"{task.name}/{split}", fs.hit)
    return fs


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def _features(fs, which: str) -> torch.Tensor:
    cls = torch.from_numpy(np.array(fs["cls"]))
    if which == "cls":
        return cls
    if which == "cls_avgpool":
        return torch.cat([cls, torch.from_numpy(np.array(fs["avgpool"]))], 1)
    raise GeodinoError(f"features={which}: choose cls or cls_avgpool")


def _labels(fs) -> torch.Tensor:
    return torch.from_numpy(np.array(fs["labels"]))


def _primary(scores: dict) -> float:
    return scores.get("accuracy", scores.get("f1_micro"))


def eval_classification(ctx, task: GeobenchTask, extractor, band_mode, scaling, mean, std) -> dict:
    from geodino.eval.metrics import classification_scores
    from geodino.eval.probes import fit_linear_probe, knn_scores, probe_scores

    t = ctx.task
    limit = t.get("max_samples")
    splits = {s: task.names(s, limit) for s in ("train", "valid", "test")}
    for s, names in splits.items():
        if not names:
            raise DataError(f"{task.path}: the {task.partition_name} partition has an empty '{s}' split")
    fs = {s: classification_features(ctx, extractor, task, s, names, band_mode, scaling, mean, std)
          for s, names in splits.items()}
    which = str(t.get("features", "cls"))
    x = {s: _features(f, which) for s, f in fs.items()}
    y = {s: _labels(f) for s, f in fs.items()}
    ml = task.kind == "multilabel"
    trainval = bool(t.get("train_on_trainval", True))
    x_fit = torch.cat([x["train"], x["valid"]]) if trainval else x["train"]
    y_fit = torch.cat([y["train"], y["valid"]]) if trainval else y["train"]
    probes = [str(p) for p in (t.get("probes") or ["knn", "linear"])]
    out: dict = {"type": "multilabel classification" if ml else "classification", "n_classes": task.n_classes,
                 "n": {s: len(v) for s, v in splits.items()}, "probes": {}}
    for probe in probes:
        if probe == "knn":
            kw = dict(n_classes=task.n_classes, k=int(t.knn_k), temperature=float(t.get("knn_temperature", 0.07)),
                      multilabel=ml, device=ctx.device)
            valid = classification_scores(knn_scores(x["train"], y["train"], x["valid"], **kw), y["valid"], ml)
            test = classification_scores(knn_scores(x_fit, y_fit, x["test"], **kw), y["test"], ml)
            out["probes"]["knn"] = {"k": int(t.knn_k), "valid": valid, "test": test, "score": _primary(test)}
        elif probe == "linear":
            lrs = [float(v) for v in (t.get("linear_lrs") or [t.lr])]
            common = dict(n_classes=task.n_classes, multilabel=ml, epochs=int(t.epochs),
                          weight_decay=float(t.get("weight_decay", 1e-4)), batch_size=int(t.batch_size) * 8,
                          device=ctx.device, seed=ctx.seed, progress=ctx.progress)
            sweep = {}
            for lr in lrs:
                probe_m = fit_linear_probe(x["train"], y["train"], lr=lr, **common)
                sweep[f"{lr:g}"] = classification_scores(probe_scores(probe_m, x["valid"], ml), y["valid"], ml)
            best = max(lrs, key=lambda lr: _primary(sweep[f"{lr:g}"]))
            final = fit_linear_probe(x_fit, y_fit, lr=best, **common)
            test = classification_scores(probe_scores(final, x["test"], ml), y["test"], ml)
            out["probes"]["linear"] = {"lr": best, "valid_sweep": sweep, "test": test, "score": _primary(test)}
        else:
            raise GeodinoError(f"unknown probe '{probe}'; choose knn or linear")
    return out


def eval_segmentation(ctx, task: GeobenchTask, extractor, band_mode, scaling, mean, std) -> dict:
    from geodino.eval.dense import DenseSpec
    from geodino.eval.features import round_up
    from geodino.eval.tasks.common import evaluate_segmentation

    t = ctx.task
    limit = t.get("max_samples")
    trainval = bool(t.get("train_on_trainval", True))
    train_names = task.names("train", limit) + (task.names("valid", limit) if trainval else [])
    test_names = task.names("test", limit)
    train = GeobenchTiles(task, train_names, band_mode, scaling)
    test = GeobenchTiles(task, test_names, band_mode, scaling)
    h, w = train.size(0)
    window = round_up(max(h, w), extractor.patch_size)
    spec = DenseSpec(kind="seg", window=window, stride=window, mean=mean, std=std, batch_size=int(t.batch_size),
                     num_workers=ctx.num_workers, progress=ctx.progress)
    ignore = (t.get("ignore_index") or {}).get(task.name)
    exclude = list((t.get("exclude_from_mean") or {}).get(task.name) or [])
    dataset_id = {"name": task.name, "root": str(task.path.resolve()), "partition": task.partition_name,
                  "files": {"train": _files_id(task, train_names), "test": _files_id(task, test_names)}}
    seg_epochs = t.get("seg_epochs")
    res = evaluate_segmentation(
        ctx, extractor, train, test, spec, spec, num_classes=task.n_classes,
        ignore_index=None if ignore is None else int(ignore), class_names=task.class_names,
        exclude_from_mean=exclude, dataset_id=dataset_id,
        transform={"bands": band_mode, "scaling": scaling, "pad": "bottom-right to window"},
        train_split="train+valid" if trainval else "train", eval_split="test", tag=f"_{task.name}",
        epochs=None if seg_epochs is None else int(seg_epochs),
    )
    first = next(iter(res["heads"]))
    return {"type": "segmentation", "n_classes": task.n_classes,
            "n": {"train": len(train_names), "test": len(test_names)}, "window": window,
            "ignore_index": ignore, "excluded_from_mean": exclude, **res, "score": res["heads"][first]["miou"]}


def run(ctx) -> dict:
    t = ctx.task
    band_mode = str(t.get("bands", "rgb"))
    scaling = str(t.get("scaling", "minmax"))
    which = t.get("benchmark_task", "all")
    if not isinstance(which, str):
        which = [str(w) for w in which]
    tasks = [GeobenchTask(p, str(t.get("partition", "default"))) for p in find_tasks(ctx.root, which)]
    per_task: dict[str, dict] = {}
    for task in tasks:
        log.info("GEO-Bench %s (%s, %d classes)", task.name, task.kind, task.n_classes)
        # bands of the first training sample decide the input layout
        first = task.names("train")[:1]
        if not first:
            raise DataError(f"{task.path}: the {task.partition_name} partition has an empty 'train' split")
        _, _, band_names = task.read(first[0], band_mode, scaling)
        if band_mode == "rgb":
            extractor = ctx.extractor()
        else:
            extractor = ctx.extractor(in_chans=len(band_names), bands=band_names, rgb_indices=rgb_indices(band_names))
        contract = extractor.contract
        if contract.in_chans != len(band_names):
            raise GeodinoError(f"{task.name}: backbone takes {contract.in_chans} bands, bands={band_mode} gives {len(band_names)}")
        mean, std = list(contract.mean), list(contract.std)
        if task.kind == "seg":
            res = eval_segmentation(ctx, task, extractor, band_mode, scaling, mean, std)
        else:
            res = eval_classification(ctx, task, extractor, band_mode, scaling, mean, std)
            _pca_figure(ctx, task, extractor, band_mode, scaling, mean, std)
        res["bands"] = band_names
        per_task[task.name] = res
    summary: dict = {}
    cls_tasks = {k: v for k, v in per_task.items() if v["type"] != "segmentation"}
    seg_tasks = {k: v for k, v in per_task.items() if v["type"] == "segmentation"}
    if cls_tasks:
        probes = sorted({p for v in cls_tasks.values() for p in v["probes"]})
        summary["classification_mean"] = {p: float(np.mean([v["probes"][p]["score"] for v in cls_tasks.values()]))
                                          for p in probes}
    if seg_tasks:
        summary["segmentation_mean"] = float(np.mean([v["score"] for v in seg_tasks.values()]))
    headline = {}
    for name, v in per_task.items():
        if v["type"] == "segmentation":
            headline[f"{name} mIoU"] = v["score"]
        else:
            for p, r in v["probes"].items():
                headline[f"{name} {p}"] = r["score"]
    return {
        "protocol": {"bands": band_mode, "scaling": f"{scaling} per band from band_stats.json, then backbone mean/std",
                     "partition": str(t.get("partition", "default")), "train_on_trainval": bool(t.get("train_on_trainval", True)),
                     "classification": "kNN (cosine, T=0.07) and linear probe on the CLS token; accuracy / multilabel F1 "
                                       "(micro, 0.5) on test",
                     "segmentation": "linear head / light decoder on patch tokens; mIoU on test"},
        "tasks": per_task,
        **summary,
        "headline": headline,
    }


def _pca_figure(ctx, task: GeobenchTask, extractor, band_mode, scaling, mean, std) -> None:
    """PCA of the patch features of the first test sample (skipped when the sample has < 3 tokens)."""
    if ctx.n_figures <= 0:
        return
    try:
        from geodino.figures import pca_feature_png

        image, _, _ = task.read(task.names("test")[0], band_mode, scaling)
        p = extractor.patch_size
        if (image.shape[-2] // p) * (image.shape[-1] // p) < 3:
            return
        pca_feature_png(extractor.backbone, image, ctx.figures_dir / f"pca_features_{task.name}.png")
    except Exception as e:  # a figure must never fail a finished evaluation
        log.warning("no PCA figure for %s: %s", task.name, e)
