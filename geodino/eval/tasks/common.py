"""Shared pieces of the dense tasks: cached window features, head training, stitched evaluation."""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from geodino.errors import GeodinoError
from geodino.eval.dense import DenseSpec, TileSet, extract_windows, holdout, predict_tiles
from geodino.eval.features import FeatureSet, backbone_fingerprint
from geodino.eval.metrics import RegressionMetric, SegmentationMetric
from geodino.eval.finetune import (DenseNet, WindowDataset, build_augment, build_net, prepare_backbone, safe_name,
                                   save_dense_checkpoint, train_on_images)
from geodino.eval.probes import DenseModel, build_dense_head, lr_grid, sweep_lr, train_dense_head
from geodino.models.extract import Extractor
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
                    transform: dict, cache=None) -> FeatureSet:
    """Window features of `tiles` with `extractor` (cached in `cache`, default the run's feature cache)."""
    cache = ctx.cache if cache is None else cache
    key = cache.key(backbone=backbone_fingerprint(extractor.backbone), dataset=dataset_id, split=split,
                        transform={**transform, "window": spec.window, "stride": spec.stride, "kind": spec.kind,
                                   "mean": list(extractor.contract.mean), "std": list(extractor.contract.std),
                                   "layers": extractor.cache_id})
    fs = extract_windows(extractor, tiles, spec, cache, ctx.task_name, key, desc=f"{split} features")
    if cache is ctx.cache:
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


def on_images(t) -> bool:
    """Whether heads train on images (augmentation or fine-tuning) instead of cached frozen features."""
    return bool(t.get("augment")) or str(t.get("finetune", "none") or "none") != "none"


@dataclass
class Fitted:
    """A trained dense model: `net` (backbone + head) and the extractor that gives its features for scoring."""

    net: DenseNet
    extractor: Extractor

    @property
    def model(self) -> DenseModel:
        return self.net.model


class DenseFitter:
    """Trains one head kind per learning rate, on cached features (frozen backbone, no augmentation) or on image
    windows (`geodino.eval.finetune`), and gives the features a fitted model is scored on."""

    def __init__(self, ctx, extractor, kind: str, n_out: int, train_tiles: TileSet, train_spec: DenseSpec,
                 train_split: str, dataset_id: dict, transform: dict, epochs: int, ignore_index: int | None = None,
                 allowed: Sequence[int] | None = None):
        self.ctx, self.extractor, self.kind, self.n_out = ctx, extractor, kind, n_out
        self.train_tiles, self.train_spec, self.train_split = train_tiles, train_spec, train_split
        self.dataset_id, self.transform, self.epochs = dataset_id, transform, int(epochs)
        self.ignore_index, self.allowed = ignore_index, allowed
        self.images = on_images(ctx.task)
        self.t_mean, self.t_std = 0.0, 1.0
        self._frozen: dict = {}
        self.fs_train = None if self.images else self.features(extractor, train_tiles, train_spec, train_split)

    def set_target_stats(self, mean: float, std: float) -> None:
        self.t_mean, self.t_std = float(mean), float(std)

    def features(self, extractor, tiles: TileSet, spec: DenseSpec, split: str) -> FeatureSet:
        """Frozen features come from the run's cache (kept open per split); a fine-tuned backbone's go to the run's
        scratch folder."""
        if extractor is not self.extractor:
            return window_features(self.ctx, extractor, tiles, spec, split, self.dataset_id, self.transform,
                                   cache=self.ctx.scratch_cache())
        key = (split, spec.window, spec.stride)
        if key not in self._frozen:
            self._frozen[key] = window_features(self.ctx, extractor, tiles, spec, split, self.dataset_id,
                                                self.transform)
        return self._frozen[key]

    def fit(self, head_kind: str, lr: float, tiles: TileSet | None = None, split: str | None = None) -> Fitted:
        ctx, t = self.ctx, self.ctx.task
        hidden = int(t.get("decoder_dim", 128) or 128)
        desc = f"{head_kind} head lr {lr:g}"
        torch.manual_seed(ctx.seed)
        if not self.images:
            fs = self.fs_train if tiles is None else self.features(self.extractor, tiles, self.train_spec, split)
            head = build_dense_head(head_kind, int(fs.meta["dim"]), self.n_out, hidden, fs.meta.get("layer_dims"))
            model = DenseModel(head, self.kind, allowed_classes=self.allowed, target_mean=self.t_mean,
                               target_std=self.t_std)
            train_dense_head(model, fs["feats"], fs["targets"], fs["valid"] if "valid" in fs else None,
                             ignore_index=self.ignore_index, epochs=self.epochs, lr=float(lr),
                             weight_decay=float(t.get("weight_decay", 1e-4)), batch_size=int(t.batch_size),
                             device=ctx.device, seed=ctx.seed, progress=ctx.progress, desc=desc)
            return Fitted(DenseNet(self.extractor.backbone, model, self.extractor.layers), self.extractor)
        # image path: a fresh copy of the frozen backbone per fit (fine-tuning changes it)
        mode = str(t.get("finetune", "none") or "none")
        backbone = self.extractor.backbone if mode == "none" else copy.deepcopy(self.extractor.backbone)
        lora = t.get("lora") or {}
        prepare_backbone(backbone, mode, r=int(lora.get("r", 8)), alpha=float(lora.get("alpha", 16)),
                         dropout=float(lora.get("dropout", 0.0)))
        torch.manual_seed(ctx.seed)
        net = build_net(backbone, head_kind, self.n_out, self.kind, self.extractor.layers, self.train_spec.window,
                        hidden, allowed=self.allowed, t_mean=self.t_mean, t_std=self.t_std)
        aug = build_augment(list(t.get("augment") or []), self.train_spec.window,
                            list(t.get("crop_scale") or (0.5, 1.0)))
        data = WindowDataset(self.train_tiles if tiles is None else tiles, self.train_spec.window,
                             self.train_spec.stride, self.kind, aug)
        train_on_images(net, data, epochs=self.epochs, lr=float(lr), weight_decay=float(t.get("weight_decay", 1e-4)),
                        layer_decay=float(t.get("layer_decay", 1.0)),
                        backbone_lr_mult=float(t.get("backbone_lr_mult", 1.0)),
                        batch_size=int(t.batch_size), ignore_index=self.ignore_index, device=ctx.device, seed=ctx.seed,
                        num_workers=ctx.num_workers, progress=ctx.progress, desc=f"{desc} ({mode} backbone)")
        ext = self.extractor if mode == "none" else Extractor(net.backbone, ctx.device, layers=self.extractor.layers)
        return Fitted(net, ext)

    def save(self, fitted: Fitted, name: str, head_kind: str, class_names=None, extra: dict | None = None) -> None:
        """``save_heads=true``: ``<run_dir>/heads/<name>.pt`` (backbone file + head; `geodino.segment.heads`)."""
        ctx = self.ctx
        if not ctx.cfg.get("save_heads", False):
            return
        path = ctx.run_dir / "heads" / f"{safe_name(name)}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_dense_checkpoint(path, fitted.net, head_kind=head_kind,
                              hidden=int(ctx.task.get("decoder_dim", 128) or 128), window=self.train_spec.window, class_names=class_names, ignore_index=self.ignore_index,
                              finetune=str(ctx.task.get("finetune", "none") or "none"), task=ctx.task_name, extra=extra)
        ctx.saved_heads[name] = str(path)


def fit_with_sweep(ctx, fit, score, higher_is_better: bool, val_split: str | None, can_score: bool,
                   refit=None, refit_split: str | None = None, lrs: Sequence[float] | None = None
                   ) -> tuple[Fitted, dict]:
    """`fit(lr)` over the grid (``task.lrs``, else ``[task.lr]``); with several learning rates each model is scored
    on the validation split and the best kept — refitted by `refit(lr)` (on train + val) when given. Returns the
    model to report and the sweep record for results.json."""
    lrs = list(lrs) if lrs else lr_grid(ctx.task)
    if len(lrs) == 1:
        return fit(lrs[0]), {"grid": lrs, "best_lr": lrs[0], "val": {}, "selected_on": None}
    if not can_score:
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


def _protocol_of(t) -> dict:
    return {"finetune": str(t.get("finetune", "none") or "none"), "augment": list(t.get("augment") or []),
            "trained_on": "images" if on_images(t) else "cached frozen features"}


def evaluate_segmentation(ctx, extractor, train_tiles: TileSet, eval_tiles: TileSet, train_spec: DenseSpec,
                          eval_spec: DenseSpec, *,
                          num_classes: int, ignore_index: int | None, class_names: Sequence[str],
                          exclude_from_mean: Sequence[int] = (), dataset_id: dict, transform: dict,
                          train_split: str, eval_split: str, tag: str = "", epochs: int | None = None,
                          val_tiles: TileSet | None = None, val_split: str | None = None,
                          refit_tiles: TileSet | None = None, refit_split: str | None = None,
                          lrs: Sequence[float] | None = None) -> dict:
    """Fit each configured head (sweeping `lrs` — default ``task.lrs`` — on `val_tiles`, refitting on
    `refit_tiles` when given), evaluate stitched `eval_tiles`, per-group mIoU."""
    t = ctx.task
    allowed = [c for c in range(num_classes) if c != ignore_index]
    metric_args = (num_classes, ignore_index, exclude_from_mean, class_names)
    fitter = DenseFitter(ctx, extractor, "seg", num_classes, train_tiles, train_spec, train_split, dataset_id,
                         transform, int(t.epochs if epochs is None else epochs), ignore_index, allowed)
    sweeping = len(lrs or lr_grid(t)) > 1
    out: dict = {"heads": {}, **_protocol_of(t)}
    fs = None
    for head_kind in heads_of(t.get("head")):
        def score(f: Fitted) -> float:
            return score_segmentation(ctx, f.model, fitter.features(f.extractor, val_tiles, eval_spec, str(val_split)),
                                      metric_args)[0]["miou"]

        fitted, sweep = fit_with_sweep(
            ctx, lambda lr, k=head_kind: fitter.fit(k, lr), score, True, val_split, val_tiles is not None,
            refit=None if not (sweeping and refit_tiles is not None) else
            (lambda lr, k=head_kind: fitter.fit(k, lr, refit_tiles, str(refit_split))),
            refit_split=refit_split, lrs=lrs)
        fs = fitter.features(fitted.extractor, eval_tiles, eval_spec, eval_split)
        res, metric = score_segmentation(ctx, fitted.model, fs, metric_args, eval_tiles, f"{head_kind}{tag}")
        res["lr"] = sweep["best_lr"]
        res["lr_sweep"] = sweep
        res["confusion"] = metric.confusion().long().tolist()  # rows: truth, columns: prediction
        res["confusion_classes"] = list(class_names)
        res["ignore_index"] = ignore_index
        out["heads"][head_kind] = res
        fitter.save(fitted, f"{head_kind}{tag}", head_kind, class_names)
    _pca_figure(ctx, extractor, eval_tiles, eval_spec, tag)
    if fitter.fs_train is not None:
        out["n_train_windows"] = len(fitter.fs_train)
    else:
        out["n_train_windows"] = len(WindowDataset(train_tiles, train_spec.window, train_spec.stride, "seg"))
    out["n_eval_tiles"] = int(fs.meta["n_tiles"])
    out["n_eval_windows"] = len(fs)
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


def _target_stats(tiles: TileSet, fs_train: FeatureSet | None) -> np.ndarray:
    if fs_train is not None:
        return np.asarray(fs_train["targets"])[np.asarray(fs_train["valid"])]
    vals = []
    for i in range(len(tiles)):
        s = tiles.load(i)
        v = torch.as_tensor(s["valid"]).bool()
        vals.append(torch.as_tensor(s["target"]).float()[v].numpy())
    return np.concatenate(vals) if vals else np.zeros(0)


def evaluate_regression(ctx, extractor, train_tiles: TileSet, eval_tiles: TileSet, train_spec: DenseSpec,
                        eval_spec: DenseSpec, *, dataset_id: dict, transform: dict, train_split: str, eval_split: str,
                        metric_kwargs: dict, vmax: float | None = None, val_tiles: TileSet | None = None,
                        val_split: str | None = None) -> dict:
    t = ctx.task
    fitter = DenseFitter(ctx, extractor, "reg", 1, train_tiles, train_spec, train_split, dataset_id, transform,
                         int(t.epochs))
    tv = _target_stats(train_tiles, fitter.fs_train)
    if tv.size == 0:
        raise GeodinoError(f"the {train_split} split has no valid canopy-height pixels")
    t_mean, t_std = float(tv.mean()), float(max(tv.std(), 1e-3))
    fitter.set_target_stats(t_mean, t_std)
    fs = None
    out: dict = {"heads": {}, "target_mean_m": t_mean, "target_std_m": t_std, **_protocol_of(t)}
    for head_kind in heads_of(t.get("head")):
        def score(f: Fitted) -> float:
            return score_regression(ctx, f.model, fitter.features(f.extractor, val_tiles, eval_spec, str(val_split)),
                                    metric_kwargs)["mae"]

        fitted, sweep = fit_with_sweep(ctx, lambda lr, k=head_kind: fitter.fit(k, lr), score, False, val_split,
                                       val_tiles is not None)
        fs = fitter.features(fitted.extractor, eval_tiles, eval_spec, eval_split)
        res = score_regression(ctx, fitted.model, fs, metric_kwargs, eval_tiles, head_kind, vmax)
        res["lr"] = sweep["best_lr"]
        res["lr_sweep"] = sweep
        out["heads"][head_kind] = res
        fitter.save(fitted, head_kind, head_kind, None, extra={"target_mean_m": t_mean, "target_std_m": t_std})
    _pca_figure(ctx, extractor, eval_tiles, eval_spec, "")
    out["n_train_windows"] = (len(fitter.fs_train) if fitter.fs_train is not None else
                              len(WindowDataset(train_tiles, train_spec.window, train_spec.stride, "reg")))
    out["n_eval_tiles"] = int(fs.meta["n_tiles"])
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60]
