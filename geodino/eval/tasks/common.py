"""Shared pieces of the dense tasks: cached window features, head training, stitched evaluation."""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np
import torch

from geodino.errors import GeodinoError
from geodino.eval.dense import DenseSpec, TileSet, extract_windows, predict_tiles
from geodino.eval.features import FeatureSet, backbone_fingerprint
from geodino.eval.metrics import RegressionMetric, SegmentationMetric
from geodino.eval.probes import DenseModel, build_dense_head, train_dense_head
from geodino.figures import class_map_png, height_map_png, pca_feature_png

log = logging.getLogger("geodino")


def heads_of(value) -> list[str]:
    """`head: linear` or `head: [linear, light_decoder]`."""
    if value is None:
        return ["linear"]
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def window_features(ctx, extractor, tiles: TileSet, spec: DenseSpec, split: str, dataset_id: dict,
                    transform: dict) -> FeatureSet:
    key = ctx.cache.key(backbone=backbone_fingerprint(extractor.backbone), dataset=dataset_id, split=split,
                        transform={**transform, "window": spec.window, "stride": spec.stride, "kind": spec.kind,
                                   "mean": list(extractor.contract.mean), "std": list(extractor.contract.std),
                                   "layers": extractor.cache_id})
    fs = extract_windows(extractor, tiles, spec, ctx.cache, ctx.task_name, key, desc=f"{split} features")
    ctx.note_cache(f"{dataset_id.get('name', ctx.task_name)}/{split}", fs.hit)
    return fs


def _pca_figure(ctx, extractor, tiles: TileSet, spec: DenseSpec, tag: str) -> None:
    if ctx.n_figures <= 0 or len(tiles) == 0:
        return
    try:
        img = tiles.load(0)["image"].float()
        win = spec.window
        pca_feature_png(extractor.backbone, img[:, :win, :win].cpu(), ctx.figures_dir / f"pca_features{tag}.png")
    except Exception as e:  # a figure must never fail a finished evaluation
        log.warning("no PCA figure: %s", e)


def evaluate_segmentation(ctx, extractor, train_tiles: TileSet, eval_tiles: TileSet, train_spec: DenseSpec,
                          eval_spec: DenseSpec, *,
                          num_classes: int, ignore_index: int | None, class_names: Sequence[str],
                          exclude_from_mean: Sequence[int] = (), dataset_id: dict, transform: dict,
                          train_split: str, eval_split: str, tag: str = "", epochs: int | None = None) -> dict:
    """Fit each configured head on cached train windows, evaluate stitched tiles, per-group mIoU."""
    t = ctx.task
    fs_train = window_features(ctx, extractor, train_tiles, train_spec, train_split, dataset_id, transform)
    fs_eval = window_features(ctx, extractor, eval_tiles, eval_spec, eval_split, dataset_id, transform)
    allowed = [c for c in range(num_classes) if c != ignore_index]
    out: dict = {"heads": {}}
    for head_kind in heads_of(t.get("head")):
        torch.manual_seed(ctx.seed)
        head = build_dense_head(head_kind, int(fs_train.meta["dim"]), num_classes, int(t.get("decoder_dim", 128) or 128),
                                fs_train.meta.get("layer_dims"))
        model = DenseModel(head, "seg", allowed_classes=allowed)
        train_dense_head(model, fs_train["feats"], fs_train["targets"], ignore_index=ignore_index,
                         epochs=int(t.epochs if epochs is None else epochs), lr=float(t.lr), weight_decay=float(t.get("weight_decay", 1e-4)),
                         batch_size=int(t.batch_size), device=ctx.device, seed=ctx.seed, progress=ctx.progress,
                         desc=f"{head_kind} head{tag}")
        metric = SegmentationMetric(num_classes, ignore_index, exclude_from_mean, class_names)
        per_group: dict[str, SegmentationMetric] = {}
        for r in predict_tiles(fs_eval, model.predict, num_classes, batch_size=int(t.batch_size), device=ctx.device):
            pred = r["output"].argmax(0)
            metric.update(pred, r["target"])
            g = r["group"]
            if g:
                per_group.setdefault(g, SegmentationMetric(num_classes, ignore_index, exclude_from_mean, class_names))
                per_group[g].update(pred, r["target"])
            if r["tile"] < ctx.n_figures:
                try:
                    img = eval_tiles.load(r["tile"])["image"]
                    class_map_png(img, r["target"], pred, num_classes,
                                  ctx.figures_dir / f"{head_kind}{tag}_{r['tile']:02d}_{_safe(r['name'])}.png",
                                  ignore_index=ignore_index)
                except Exception as e:
                    log.warning("no figure for tile %s: %s", r["name"], e)
        res = metric.compute()
        if per_group:
            res["per_group"] = {g: m.compute() for g, m in sorted(per_group.items())}
        out["heads"][head_kind] = res
    _pca_figure(ctx, extractor, eval_tiles, eval_spec, tag)
    out["n_train_windows"] = len(fs_train)
    out["n_eval_tiles"] = int(fs_eval.meta["n_tiles"])
    out["n_eval_windows"] = len(fs_eval)
    return out


def evaluate_regression(ctx, extractor, train_tiles: TileSet, eval_tiles: TileSet, train_spec: DenseSpec,
                        eval_spec: DenseSpec, *, dataset_id: dict, transform: dict, train_split: str, eval_split: str,
                        metric_kwargs: dict, vmax: float | None = None) -> dict:
    t = ctx.task
    fs_train = window_features(ctx, extractor, train_tiles, train_spec, train_split, dataset_id, transform)
    fs_eval = window_features(ctx, extractor, eval_tiles, eval_spec, eval_split, dataset_id, transform)
    tv = np.asarray(fs_train["targets"])[np.asarray(fs_train["valid"])]
    if tv.size == 0:
        raise GeodinoError(f"the {train_split} split has no valid canopy-height pixels")
    t_mean, t_std = float(tv.mean()), float(max(tv.std(), 1e-3))
    out: dict = {"heads": {}, "target_mean_m": t_mean, "target_std_m": t_std}
    for head_kind in heads_of(t.get("head")):
        torch.manual_seed(ctx.seed)
        head = build_dense_head(head_kind, int(fs_train.meta["dim"]), 1, int(t.get("decoder_dim", 128) or 128),
                                fs_train.meta.get("layer_dims"))
        model = DenseModel(head, "reg", target_mean=t_mean, target_std=t_std)
        train_dense_head(model, fs_train["feats"], fs_train["targets"], fs_train["valid"], epochs=int(t.epochs),
                         lr=float(t.lr), weight_decay=float(t.get("weight_decay", 1e-4)), batch_size=int(t.batch_size),
                         device=ctx.device, seed=ctx.seed, progress=ctx.progress, desc=f"{head_kind} head")
        metric = RegressionMetric(**metric_kwargs)
        for r in predict_tiles(fs_eval, model.predict, 1, batch_size=int(t.batch_size), device=ctx.device):
            pred = r["output"][0]
            metric.update(pred, r["target"], r["valid"])
            if r["tile"] < ctx.n_figures:
                try:
                    img = eval_tiles.load(r["tile"])["image"]
                    height_map_png(img, r["target"], pred, r["valid"],
                                   ctx.figures_dir / f"{head_kind}_{r['tile']:02d}_{_safe(r['name'])}.png", vmax=vmax)
                except Exception as e:
                    log.warning("no figure for tile %s: %s", r["name"], e)
        out["heads"][head_kind] = metric.compute()
    _pca_figure(ctx, extractor, eval_tiles, eval_spec, "")
    out["n_train_windows"] = len(fs_train)
    out["n_eval_tiles"] = int(fs_eval.meta["n_tiles"])
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60]
