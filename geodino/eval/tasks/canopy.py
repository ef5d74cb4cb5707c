"""Canopy-height regression (docs/eo_data.md §4) on paired RGB / canopy-height-model GeoTIFFs, read by
`geodino.eval.datasets.canopy` (which documents the format).

Protocol: frozen backbone on ``patch``-pixel windows (training windows do not overlap; evaluation
uses a sliding window with ``stride`` and averages overlaps), a linear head (or light decoder) on patch
tokens regressing standardised heights with an L1 loss on valid pixels, logits bilinearly upsampled
to pixels, predictions clamped at 0. Metrics on valid pixels of ``eval_split``: MAE, RMSE, bias, pixel
R², block R² (``block_size``-pixel blocks, ``border`` pixels dropped), nMAE, tree-cover IoU at
``tree_threshold_m`` and MAE per height bin.
"""

from __future__ import annotations

from geodino.errors import GeodinoError
from geodino.eval.datasets.canopy import CanopyTiles, read_meta
from geodino.eval.dense import DenseSpec
from geodino.eval.features import files_identity
from geodino.eval.probes import lr_grid
from geodino.eval.tasks.common import evaluate_regression, sweep_split


def run(ctx) -> dict:
    t = ctx.task
    root = ctx.root
    meta = read_meta(root)
    max_h = t.get("max_height_m") or meta.get("max_height_m")
    train_split, eval_split = str(t.get("train_split", "train")), str(t.get("eval_split", "test"))
    train = CanopyTiles(root, train_split, meta, max_h)
    evals = CanopyTiles(root, eval_split, meta, max_h)
    extractor = ctx.extractor()
    contract = extractor.contract
    if contract.in_chans != 3:
        raise GeodinoError(f"the canopy task feeds RGB but backbone {contract.name} takes {contract.in_chans} bands")
    window = int(t.patch)
    stride = int(t.get("stride") or max(extractor.patch_size, window // 2))
    common = dict(kind="reg", window=window, batch_size=int(t.batch_size),
                  num_workers=ctx.num_workers, progress=ctx.progress)
    dataset_id = {"name": meta.get("name", "canopy"), "root": str(root.resolve()),
                  "files": {train_split: files_identity(train.files()), eval_split: files_identity(evals.files())}}
    rgb_bands = [train.bands[i] for i in train.rgb]
    train, val, fit_split, val_split = sweep_split(ctx, train, lambda split: CanopyTiles(root, split, meta, max_h),
                                                   train_split, eval_split)
    if val is not None and hasattr(val, "files"):
        dataset_id["files"][val_split] = files_identity(val.files())
    block = int(t.block_size)
    gsd = meta.get("gsd_m")
    res = evaluate_regression(
        ctx, extractor, train, evals, DenseSpec(stride=window, **common), DenseSpec(stride=stride, **common),
        dataset_id=dataset_id, transform={"scale": meta.get("image_scale", "uint8/255"), "max_height_m": max_h,
                                          "bands": rgb_bands},
        train_split=fit_split, eval_split=eval_split, val_tiles=val, val_split=val_split,
        metric_kwargs=dict(block_size=block, border=int(t.get("border", 3)), min_block_valid=float(t.get("min_block_valid", 0.5)),
                           threshold=float(t.get("tree_threshold_m", 2.0)), bins=list(t.get("height_bins") or [0, 5, 10, 20])),
    )
    first = next(iter(res["heads"]))
    r = res["heads"][first]
    return {
        "protocol": {"name": str(t.get("protocol", "quick")), "layers": ctx.layers_used(), "split": f"train on {train_split}, evaluate on {eval_split}", "window": window, "stride": stride,
                     "block_size_px": block, "block_size_m": (block * float(gsd)) if gsd else None,
                     "border_px": int(t.get("border", 3)), "heads": list(res["heads"]), "loss": "L1 on standardised heights",
                     "epochs": int(t.epochs), "lrs": lr_grid(t), "lr_selected_on": val_split, "max_height_m": max_h},
        "mae": r["mae"], "rmse": r["rmse"], "bias": r["bias"], "r2": r["r2"], "block_r2": r["block_r2"],
        **res,
        "headline": {f"MAE m ({h})": v["mae"] for h, v in res["heads"].items()}
                    | {f"block R2 ({h})": v["block_r2"] for h, v in res["heads"].items()},
    }
