"""LoveDA semantic segmentation (docs/eo_data.md §1-2) on the LoveDA tree, read by
`geodino.eval.datasets.loveda` (which documents the layout and mask encoding).

Protocol: frozen backbone, patch tokens of sliding windows (``window``/``stride`` from the task
config) -> linear head (BN + 1x1 conv, logits bilinearly upsampled to pixels) or light decoder,
trained with cross-entropy that ignores no-data; evaluation stitches overlapping windows back into
the 1024² tiles (averaged class probabilities), and scores mIoU with
``MulticlassJaccardIndex(num_classes=8, ignore_index=0, average='macro')`` — the mean IoU over
classes 1..7 — plus per-class IoU and per-scene (urban / rural) results.
"""

from __future__ import annotations

from geodino.errors import GeodinoError
from geodino.eval.datasets.loveda import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, SCENES, LoveDATiles
from geodino.eval.dense import DenseSpec
from geodino.eval.features import files_identity
from geodino.eval.probes import lr_grid
from geodino.eval.tasks.common import evaluate_segmentation, sweep_split


def run(ctx) -> dict:
    t = ctx.task
    root = ctx.root
    scenes = list(t.get("scenes") or SCENES)
    train_split, eval_split = str(t.get("train_split", "train")), str(t.get("eval_split", "val"))
    train = LoveDATiles(root, train_split, scenes, t.get("max_train_tiles"))
    evals = LoveDATiles(root, eval_split, scenes, t.get("max_eval_tiles"))
    extractor = ctx.extractor()
    contract = extractor.contract
    if contract.in_chans != 3:
        raise GeodinoError(f"LoveDA is RGB but backbone {contract.name} takes {contract.in_chans} bands")
    window = int(t.window)
    stride = int(t.stride)
    train_stride = int(t.get("train_stride") or window)
    common = dict(kind="seg", window=window, batch_size=int(t.get("feature_batch_size") or t.batch_size), num_workers=ctx.num_workers,
                  progress=ctx.progress)
    dataset_id = {"name": "loveda", "root": str(root.resolve()), "scenes": scenes,
                  "files": {train_split: files_identity(train.files()), eval_split: files_identity(evals.files())}}
    train, val, fit_split, val_split = sweep_split(
        ctx, train, lambda split: LoveDATiles(root, split, scenes, t.get("max_eval_tiles")), train_split, eval_split)
    if val is not None and hasattr(val, "files"):
        dataset_id["files"][val_split] = files_identity(val.files())
    res = evaluate_segmentation(
        ctx, extractor, train, evals, DenseSpec(stride=train_stride, **common), DenseSpec(stride=stride, **common),
        num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, class_names=CLASS_NAMES, dataset_id=dataset_id,
        transform={"scale": "divide by 255"}, train_split=fit_split, eval_split=eval_split, val_tiles=val,
        val_split=val_split,
    )
    first = next(iter(res["heads"]))
    headline = {f"mIoU ({h}, {eval_split})": r["miou"] for h, r in res["heads"].items()}
    return {
        "protocol": {
            "name": str(t.get("protocol", "quick")), "layers": ctx.layers_used(),
            "split": f"train on {train_split}, evaluate on {eval_split}",
            "scenes": scenes,
            "metric": "MulticlassJaccardIndex(num_classes=8, ignore_index=0, average='macro') = mIoU over classes 1..7",
            "window": window, "stride": stride, "train_stride": train_stride, "heads": list(res["heads"]),
            "epochs": int(t.epochs), "lrs": lr_grid(t), "lr_selected_on": val_split,
        },
        "miou": res["heads"][first]["miou"],
        **res,
        "headline": headline,
    }
