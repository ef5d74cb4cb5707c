"""Shared pieces of the dense tasks: cached window features, head training, stitched evaluation."""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np
import torch

from geodino.errors import GeodinoError
from geodino.eval.dense import DenseSpec, TileSet, extract_windows, holdout, predict_tiles
from geodino.eval.features import FeatureSet, backbone_fingerprint
from geodino.eval.metrics import RegressionMetric, SegmentationMetric
from geodino.eval.probes import DenseModel, build_dense_head, lr_grid, sweep_lr, train_dense_head
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


def sweep_split(ctx, train_tiles: TileSet, open_split, train_split: str, eval_split: str
                ) -> tuple[TileSet, TileSet | None, str, str | None]:
    """Where a learning-rate sweep (``task.lrs`` with several values) is scored:
    ``(train tiles, validation tiles, train split name, validation split name)``. ``task.val_split`` names a split
    (opened by `open_split`); null holds out a seeded ``task.val_fraction`` of the training tiles (the rest train).
    Without a sweep nothing is held out."""
    t = ctx.task
    if len(lr_grid(t)) == 1:
        return train_tiles, None, train_split, None
    vs = t.get("val_split")
    if vs:
        vs = str(vs)
        if vs == eval_split:
            log.warning("task.val_split=%s is also the reported split: the learning rate is picked on the numbers "
                        "it reports (optimistic)", vs)
        return train_tiles, open_split(vs), train_split, vs
    frac = float(t.get("val_fraction") or 0.1)
    rest, held = holdout(train_tiles, frac, ctx.seed)
    tag = f"{frac:g} held out, seed {ctx.seed}"
    return rest, held, f"{train_split}[rest: {tag}]", f"{train_split}[{tag}]"


def _fit(ctx, head_kind: str, fs: FeatureSet, n_out: int, kind: str, lr: float, epochs: int, desc: str,
         allowed: Sequence[int] | None = None, ignore_index: int | None = None, t_mean: float = 0.0,
         t_std: float = 1.0) -> DenseModel:
    """One head of `head_kind` trained on cached windows with one learning rate (seeded: a sweep's models differ
    by their learning rate only)."""
    t = ctx.task
    torch.manual_seed(ctx.seed)
    head = build_dense_head(head_kind, int(fs.meta["dim"]), n_out, int(t.get("decoder_dim", 128) or 128),
                            fs.meta.get("layer_dims"))
    model = DenseModel(head, kind, allowed_classes=allowed, target_mean=t_mean, target_std=t_std)
    return train_dense_head(model, fs["feats"], fs["targets"], fs["valid"] if "valid" in fs else None,
                            ignore_index=ignore_index, epochs=int(epochs), lr=float(lr),
                            weight_decay=float(t.get("weight_decay", 1e-4)), batch_size=int(t.batch_size),
                            device=ctx.device, seed=ctx.seed, progress=ctx.progress, desc=f"{desc} lr {lr:g}")


def fit_with_sweep(ctx, fit, fs_val: FeatureSet | None, score, higher_is_better: bool, val_split: str | None,
                   refit=None, refit_split: str | None = None) -> tuple[DenseModel, dict]:
    """`fit(lr)` over the grid (``task.lrs``, else ``[task.lr]``); with several learning rates each model is scored
    on `fs_val` and the best kept — refitted by `refit(lr)` (on train + val) when given. Returns the model to
    report and the sweep record for results.json."""
    lrs = lr_grid(ctx.task)
    if len(lrs) == 1:
        return fit(lrs[0]), {"grid": lrs, "best_lr": lrs[0], "val": {}, "selected_on": None}
    if fs_val is None:
        raise GeodinoError(f"task.lrs={lrs} sweeps learning rates but no validation split is set "
                           "(task.val_split, or task.val_fraction to hold out training tiles)")
    best, model, curve = sweep_lr(lrs, fit, score, higher_is_better)
    record = {"grid": lrs, "best_lr": best, "val": curve, "selected_on": val_split,
              "metric": "miou" if higher_is_better else "mae", "higher_is_better": higher_is_better}
    if refit is not None:
        model = refit(best)
        record["refit_on"] = refit_split
    return model, record


def score_segmentation(ctx, model: DenseModel, fs: FeatureSet, metric_args: tuple, tiles: TileSet | None = None,
                       fig_prefix: str | None = None) -> tuple[dict, SegmentationMetric]:
    """Stitched tiles of `fs` -> mIoU (+ per group), and figures of the first tiles when `tiles`/`fig_prefix`."""
    t = ctx.task
    num_classes, ignore_index = metric_args[0], metric_args[1]
    metric = SegmentationMetric(*metric_args)
    per_group: dict[str, SegmentationMetric] = {}
    for r in predict_tiles(fs, model.predict, num_classes, batch_size=int(t.batch_size), device=ctx.device):
        pred = r["output"].argmax(0)
        metric.update(pred, r["target"])
        g = r["group"]
        if g:
            per_group.setdefault(g, SegmentationMetric(*metric_args))
            per_group[g].update(pred, r["target"])
        if fig_prefix is not None and tiles is not None and r["tile"] < ctx.n_figures:
            try:
                img = tiles.load(r["tile"])["image"]
                class_map_png(img, r["target"], pred, num_classes,
                              ctx.figures_dir / f"{fig_prefix}_{r['tile']:02d}_{_safe(r['name'])}.png",
                              ignore_index=ignore_index)
            except Exception as e:
                log.warning("no figure for tile %s: %s", r["name"], e)
    res = metric.compute()
    if per_group:
        res["per_group"] = {g: m.compute() for g, m in sorted(per_group.items())}
    return res, metric


def evaluate_segmentation(ctx, extractor, train_tiles: TileSet, eval_tiles: TileSet, train_spec: DenseSpec,
                          eval_spec: DenseSpec, *,
                          num_classes: int, ignore_index: int | None, class_names: Sequence[str],
                          exclude_from_mean: Sequence[int] = (), dataset_id: dict, transform: dict,
                          train_split: str, eval_split: str, tag: str = "", epochs: int | None = None,
                          val_tiles: TileSet | None = None, val_split: str | None = None,
                          refit_tiles: TileSet | None = None, refit_split: str | None = None) -> dict:
    """Fit each configured head on cached train windows (sweeping ``task.lrs`` on `val_tiles`, refitting on
    `refit_tiles` when given), evaluate stitched `eval_tiles`, per-group mIoU."""
    t = ctx.task
    fs_train = window_features(ctx, extractor, train_tiles, train_spec, train_split, dataset_id, transform)
    fs_eval = window_features(ctx, extractor, eval_tiles, eval_spec, eval_split, dataset_id, transform)
    sweeping = len(lr_grid(t)) > 1
    fs_val = (window_features(ctx, extractor, val_tiles, eval_spec, str(val_split), dataset_id, transform)
              if sweeping and val_tiles is not None else None)
    fs_refit = (window_features(ctx, extractor, refit_tiles, train_spec, str(refit_split), dataset_id, transform)
                if sweeping and refit_tiles is not None else None)
    allowed = [c for c in range(num_classes) if c != ignore_index]
    metric_args = (num_classes, ignore_index, exclude_from_mean, class_names)
    n_epochs = int(t.epochs if epochs is None else epochs)
    out: dict = {"heads": {}}
    for head_kind in heads_of(t.get("head")):
        def fit(lr, fs=fs_train, kind=head_kind):
            return _fit(ctx, kind, fs, num_classes, "seg", lr, n_epochs, f"{kind} head{tag}", allowed=allowed,
                        ignore_index=ignore_index)

        model, sweep = fit_with_sweep(
            ctx, fit, fs_val, lambda m: score_segmentation(ctx, m, fs_val, metric_args)[0]["miou"], True, val_split,
            refit=None if fs_refit is None else (lambda lr, kind=head_kind: fit(lr, fs_refit, kind)),
            refit_split=refit_split)
        res, metric = score_segmentation(ctx, model, fs_eval, metric_args, eval_tiles, f"{head_kind}{tag}")
        res["lr"] = sweep["best_lr"]
        res["lr_sweep"] = sweep
        res["confusion"] = metric.confusion().tolist()
        out["heads"][head_kind] = res
        ctx.keep_model(f"{head_kind}{tag}", model)
    _pca_figure(ctx, extractor, eval_tiles, eval_spec, tag)
    out["n_train_windows"] = len(fs_train)
    out["n_eval_tiles"] = int(fs_eval.meta["n_tiles"])
    out["n_eval_windows"] = len(fs_eval)
    return out


def score_regression(ctx, model: DenseModel, fs: FeatureSet, metric_kwargs: dict, tiles: TileSet | None = None,
                     fig_prefix: str | None = None, vmax: float | None = None) -> dict:
    t = ctx.task
    metric = RegressionMetric(**metric_kwargs)
    for r in predict_tiles(fs, model.predict, 1, batch_size=int(t.batch_size), device=ctx.device):
        pred = r["output"][0]
        metric.update(pred, r["target"], r["valid"])
        if fig_prefix is not None and tiles is not None and r["tile"] < ctx.n_figures:
            try:
                img = tiles.load(r["tile"])["image"]
                height_map_png(img, r["target"], pred, r["valid"],
                               ctx.figures_dir / f"{fig_prefix}_{r['tile']:02d}_{_safe(r['name'])}.png", vmax=vmax)
            except Exception as e:
                log.warning("no figure for tile %s: %s", r["name"], e)
    return metric.compute()


def evaluate_regression(ctx, extractor, train_tiles: TileSet, eval_tiles: TileSet, train_spec: DenseSpec,
                        eval_spec: DenseSpec, *, dataset_id: dict, transform: dict, train_split: str, eval_split: str,
                        metric_kwargs: dict, vmax: float | None = None, val_tiles: TileSet | None = None,
                        val_split: str | None = None) -> dict:
    t = ctx.task
    fs_train = window_features(ctx, extractor, train_tiles, train_spec, train_split, dataset_id, transform)
    fs_eval = window_features(ctx, extractor, eval_tiles, eval_spec, eval_split, dataset_id, transform)
    fs_val = (window_features(ctx, extractor, val_tiles, eval_spec, str(val_split), dataset_id, transform)
              if len(lr_grid(t)) > 1 and val_tiles is not None else None)
    tv = np.asarray(fs_train["targets"])[np.asarray(fs_train["valid"])]
    if tv.size == 0:
        raise GeodinoError(f"the {train_split} split has no valid canopy-height pixels")
    t_mean, t_std = float(tv.mean()), float(max(tv.std(), 1e-3))
    out: dict = {"heads": {}, "target_mean_m": t_mean, "target_std_m": t_std}
    for head_kind in heads_of(t.get("head")):
        def fit(lr, kind=head_kind):
            return _fit(ctx, kind, fs_train, 1, "reg", lr, int(t.epochs), f"{kind} head", t_mean=t_mean, t_std=t_std)

        model, sweep = fit_with_sweep(ctx, fit, fs_val, lambda m: score_regression(ctx, m, fs_val, metric_kwargs)["mae"],
                                      False, val_split)
        res = score_regression(ctx, model, fs_eval, metric_kwargs, eval_tiles, head_kind, vmax)
        res["lr"] = sweep["best_lr"]
        res["lr_sweep"] = sweep
        out["heads"][head_kind] = res
        ctx.keep_model(head_kind, model)
    _pca_figure(ctx, extractor, eval_tiles, eval_spec, "")
    out["n_train_windows"] = len(fs_train)
    out["n_eval_tiles"] = int(fs_eval.meta["n_tiles"])
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60]
