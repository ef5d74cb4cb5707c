"""GEO-Bench v1 classification and segmentation: the DINOv3 protocol on geodino's reader
(`geodino.eval.datasets.geobench`, which documents the on-disk layout).

Protocol (DINOv3 on GEO-Bench): frozen backbone, RGB bands only (``bands=rgb``; ``bands=all`` feeds every
same-resolution band through an adapted first layer), each band mapped to [0, 1] with the dataset's
per-band min/max from ``band_stats.json`` then normalised with the backbone contract's mean/std, native
resolution (padded at the bottom/right to a multiple of the patch size). Classification: kNN (cosine,
k=20, T=0.07) and a linear probe (lr picked on ``valid``, refit on train+valid) on the CLS token,
top-1 accuracy or multilabel F1 (micro, threshold 0.5) on ``test``. Segmentation: a linear head (or
light decoder) on patch tokens, mIoU on ``test`` (m-cashew-plant: mean over classes 1..6).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from geodino.data.bands import rgb_indices
from geodino.errors import DataError, GeodinoError
from geodino.eval.datasets.geobench import GeobenchTask, GeobenchTiles, find_tasks
from geodino.eval.dense import DenseSpec
from geodino.eval.features import backbone_fingerprint, files_identity, pad_to, progress_bar, round_up
from geodino.eval.metrics import classification_scores
from geodino.eval.probes import fit_linear_probe, knn_scores, lr_grid, probe_scores, sweep_lr
from geodino.eval.tasks.common import evaluate_segmentation
from geodino.figures import pca_feature_png

log = logging.getLogger("geodino")


def _files_id(task: GeobenchTask, names: Sequence[str]) -> str:
    return files_identity([task.sample_file(n) for n in names])


def classification_features(ctx, extractor, task: GeobenchTask, split: str, names: list[str], band_mode: str,
                            scaling: str):
    """CLS and average-pooled patch features plus labels of one split (cached); samples of equal size are batched."""
    key = ctx.cache.key(backbone=backbone_fingerprint(extractor.backbone),
                        dataset={"task": task.name, "root": str(task.path.resolve()), "partition": task.partition_name,
                                 "files": _files_id(task, names)},
                        split=split, transform={"bands": band_mode, "scaling": scaling,
                                                "mean": list(extractor.contract.mean),
                                                "std": list(extractor.contract.std), "layers": extractor.cache_id,
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

            for i, name in enumerate(progress_bar(names, len(names), f"{task.name} {split}", ctx.progress)):
                image, label, _ = task.read(name, band_mode, scaling)
                if batch and image.shape[-2:] != batch[0].shape[-2:]:
                    flush(i)
                batch.append(extractor.contract.normalize(image))
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


def eval_classification(ctx, task: GeobenchTask, extractor, band_mode, scaling) -> dict:
    t = ctx.task
    limit = t.get("max_samples")
    splits = {s: task.names(s, limit) for s in ("train", "valid", "test")}
    for s, names in splits.items():
        if not names:
            raise DataError(f"{task.path}: the {task.partition_name} partition has an empty '{s}' split")
    fs = {s: classification_features(ctx, extractor, task, s, names, band_mode, scaling)
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
            lrs = lr_grid(t)
            common = dict(n_classes=task.n_classes, multilabel=ml, epochs=int(t.epochs),
                          weight_decay=float(t.get("weight_decay", 1e-4)), batch_size=int(t.batch_size) * 8,
                          device=ctx.device, seed=ctx.seed, progress=ctx.progress)
            best, _, sweep = sweep_lr(
                lrs, lambda lr: fit_linear_probe(x["train"], y["train"], lr=lr, **common),
                lambda m: _primary(classification_scores(probe_scores(m, x["valid"], ml), y["valid"], ml)))
            final = fit_linear_probe(x_fit, y_fit, lr=best, **common)
            test = classification_scores(probe_scores(final, x["test"], ml), y["test"], ml)
            out["probes"]["linear"] = {"lr": best, "valid_sweep": sweep,
                                       "lr_sweep": {"grid": lrs, "best_lr": best, "val": sweep, "selected_on": "valid",
                                                    "metric": "accuracy" if not ml else "f1_micro",
                                                    "higher_is_better": True,
                                                    "refit_on": "train+valid" if trainval else None},
                                       "test": test, "score": _primary(test)}
        else:
            raise GeodinoError(f"unknown probe '{probe}'; choose knn or linear")
    return out


def eval_segmentation(ctx, task: GeobenchTask, extractor, band_mode, scaling) -> dict:
    t = ctx.task
    limit = t.get("max_samples")
    trainval = bool(t.get("train_on_trainval", True))
    seg_lrs = [float(v) for v in (t.get("seg_lrs") or lr_grid(t))]
    sweeping = len(seg_lrs) > 1
    valid_names = task.names("valid", limit)
    # a sweep fits on train, picks on valid and refits on train + valid; one learning rate fits on train + valid
    fit_names = task.names("train", limit) + (valid_names if trainval and not sweeping else [])
    train_names = task.names("train", limit) + (valid_names if trainval else [])
    test_names = task.names("test", limit)
    train = GeobenchTiles(task, fit_names, band_mode, scaling)
    test = GeobenchTiles(task, test_names, band_mode, scaling)
    h, w = train.size(0)
    window = round_up(max(h, w), extractor.patch_size)
    spec = DenseSpec(kind="seg", window=window, stride=window, batch_size=int(t.batch_size),
                     num_workers=ctx.num_workers, progress=ctx.progress)
    ignore = (t.get("ignore_index") or {}).get(task.name)
    exclude = list((t.get("exclude_from_mean") or {}).get(task.name) or [])
    dataset_id = {"name": task.name, "root": str(task.path.resolve()), "partition": task.partition_name,
                  "files": {"train": _files_id(task, train_names), "test": _files_id(task, test_names)}}
    fit_split = "train" if sweeping or not trainval else "train+valid"
    sweep_kw = {}
    if sweeping:
        sweep_kw = dict(val_tiles=GeobenchTiles(task, valid_names, band_mode, scaling), val_split="valid")
        if trainval:
            sweep_kw.update(refit_tiles=GeobenchTiles(task, train_names, band_mode, scaling), refit_split="train+valid")
    seg_epochs = t.get("seg_epochs")
    res = evaluate_segmentation(
        ctx, extractor, train, test, spec, spec, num_classes=task.n_classes,
        ignore_index=None if ignore is None else int(ignore), class_names=task.class_names,
        exclude_from_mean=exclude, dataset_id=dataset_id,
        transform={"bands": band_mode, "scaling": scaling, "pad": "bottom-right to window"},
        train_split=fit_split, eval_split="test", tag=f"_{task.name}",
        epochs=None if seg_epochs is None else int(seg_epochs), lrs=seg_lrs, **sweep_kw,
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
        if task.kind == "seg":
            res = eval_segmentation(ctx, task, extractor, band_mode, scaling)
        else:
            res = eval_classification(ctx, task, extractor, band_mode, scaling)
            _pca_figure(ctx, task, extractor, band_mode, scaling)
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
        "protocol": {"name": str(t.get("protocol", "quick")), "layers": ctx.layers_used(),
                     "bands": band_mode, "scaling": f"{scaling} per band from band_stats.json, then backbone mean/std",
                     "partition": str(t.get("partition", "default")), "train_on_trainval": bool(t.get("train_on_trainval", True)),
                     "classification": "kNN (cosine, T=0.07) and linear probe on the CLS token; accuracy / multilabel F1 "
                                       "(micro, 0.5) on test",
                     "segmentation": "linear head / light decoder on patch tokens; mIoU on test"},
        "tasks": per_task,
        **summary,
        "headline": headline,
    }


def _pca_figure(ctx, task: GeobenchTask, extractor, band_mode, scaling) -> None:
    """PCA of the patch features of the first test sample (skipped when the sample has < 3 tokens)."""
    if ctx.n_figures <= 0:
        return
    try:
        image, _, _ = task.read(task.names("test")[0], band_mode, scaling)
        p = extractor.patch_size
        if (image.shape[-2] // p) * (image.shape[-1] // p) < 3:
            return
        pca_feature_png(extractor.backbone, image, ctx.figures_dir / f"pca_features_{task.name}.png")
    except Exception as e:  # a figure must never fail a finished evaluation
        log.warning("no PCA figure for %s: %s", task.name, e)
