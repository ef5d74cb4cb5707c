"""Metrics of the evaluation suite.

* `SegmentationMetric`: torchmetrics `MulticlassJaccardIndex`. With ``ignore_index`` set (LoveDA:
  ``num_classes=8, ignore_index=0``) pixels whose target is the ignore value are dropped, and
  ``average='macro'`` averages the per-class IoU over the classes other than ``ignore_index`` that occur
  in the prediction or the target (torchmetrics gives a class with an empty union weight 0), i.e. the
  usual mIoU over LoveDA's 7 semantic classes. ``exclude_from_mean`` removes further classes from the
  mean only (the DINOv3 protocol for m-cashew-plant: class 0 does not occur in its test set).
  Target value ``-1`` marks padding and is always dropped.
* `RegressionMetric` (canopy height, metres): MAE, RMSE, bias (mean prediction - truth), pixel R²,
  block R² (the R² between ``block_size``-pixel block means of prediction and truth after removing a
  ``border``-pixel frame, as in Tolan et al. 2024), nMAE (mean |error| / truth on pixels at or above
  the tree threshold), tree-cover IoU at the threshold and MAE per height bin. Sums are float64.
* `classification_scores`: top-1 accuracy (multiclass) or micro / macro F1 at 0.5 (multilabel).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_accuracy, multilabel_f1_score


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int | None = None, exclude_from_mean: Sequence[int] = (),
                 class_names: Sequence[str] | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.exclude = sorted({int(c) for c in exclude_from_mean})
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        self.macro = MulticlassJaccardIndex(num_classes=self.num_classes, ignore_index=self.ignore_index, average="macro")
        self.per_class = MulticlassJaccardIndex(num_classes=self.num_classes, ignore_index=self.ignore_index, average="none")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.as_tensor(pred).reshape(-1).long()
        target = torch.as_tensor(target).reshape(-1).long()
        keep = target >= 0
        if not bool(keep.all()):
            pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        pred = pred.clamp(0, self.num_classes - 1)
        self.macro.update(pred, target)
        self.per_class.update(pred, target)

    def confusion(self) -> torch.Tensor:
        return self.per_class.confmat.clone()

    def compute(self) -> dict:
        cm = self.confusion().double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = self.per_class.compute().double()
        skip = set(self.exclude) | ({self.ignore_index} if self.ignore_index is not None else set())
        counted = [c for c in range(self.num_classes) if c not in skip and union[c] > 0]
        if self.exclude:
            miou = float(iou[counted].mean()) if counted else float("nan")
        else:
            miou = float(self.macro.compute()) if counted else float("nan")
        labelled = cm.sum()
        out = {
            "miou": 100.0 * miou,
            "pixel_accuracy": 100.0 * float(tp.sum() / labelled) if labelled > 0 else float("nan"),
            "per_class_iou": {
                self.class_names[c]: (100.0 * float(iou[c]) if union[c] > 0 else None)
                for c in range(self.num_classes) if c != self.ignore_index
            },
            "classes_in_mean": [self.class_names[c] for c in counted],
            "labelled_pixels": int(labelled),
        }
        return out


class RegressionMetric:
    def __init__(self, block_size: int = 50, border: int = 3, min_block_valid: float = 0.5,
                 threshold: float = 2.0, bins: Sequence[float] = (0, 5, 10, 20)):
        self.block_size = int(block_size)
        self.border = int(border)
        self.min_block_valid = float(min_block_valid)
        self.threshold = float(threshold)
        self.bins = [float(b) for b in bins]
        self.s = {k: 0.0 for k in ("n", "abs", "sq", "err", "y", "y2", "rel", "n_rel", "inter", "union")}
        self.bin_abs = [0.0] * len(self.bins)
        self.bin_n = [0] * len(self.bins)
        self.block_pred: list[np.ndarray] = []
        self.block_true: list[np.ndarray] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One tile (or any 2-D map): pred/target [H, W] in metres, valid [H, W] bool."""
        pred = torch.as_tensor(pred).double()
        target = torch.as_tensor(target).double()
        valid = torch.isfinite(target) if valid is None else (torch.as_tensor(valid).bool() & torch.isfinite(target))
        p, y = pred[valid], target[valid]
        if y.numel():
            e = p - y
            s = self.s
            s["n"] += y.numel()
            s["abs"] += float(e.abs().sum())
            s["sq"] += float((e * e).sum())
            s["err"] += float(e.sum())
            s["y"] += float(y.sum())
            s["y2"] += float((y * y).sum())
            tall = y >= self.threshold
            s["rel"] += float((e[tall].abs() / y[tall]).sum())
            s["n_rel"] += int(tall.sum())
            pt = p >= self.threshold
            s["inter"] += int((pt & tall).sum())
            s["union"] += int((pt | tall).sum())
            edges = self.bins + [float("inf")]
            for i in range(len(self.bins)):
                m = (y >= edges[i]) & (y < edges[i + 1])
                self.bin_abs[i] += float(e[m].abs().sum())
                self.bin_n[i] += int(m.sum())
        if pred.ndim == 2:
            self._blocks(pred, target, valid)

    def _blocks(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        b, k = self.border, self.block_size
        h, w = pred.shape
        if h - 2 * b < k or w - 2 * b < k:
            return
        sl = (slice(b, h - b), slice(b, w - b))
        v = valid[sl].double()
        p = torch.where(valid[sl], pred[sl], 0.0)
        y = torch.where(valid[sl], target[sl], 0.0)
        pool = torch.nn.functional.avg_pool2d
        frac = pool(v[None, None], k, k)[0, 0]
        ok = frac >= self.min_block_valid
        if not bool(ok.any()):
            return
        pm = pool(p[None, None], k, k)[0, 0] / frac.clamp_min(1e-12)
        ym = pool(y[None, None], k, k)[0, 0] / frac.clamp_min(1e-12)
        self.block_pred.append(pm[ok].numpy())
        self.block_true.append(ym[ok].numpy())

    @staticmethod
    def _r2(p: np.ndarray, y: np.ndarray) -> float:
        if y.size < 2:
            return float("nan")
        sst = float(((y - y.mean()) ** 2).sum())
        return float("nan") if sst == 0 else 1.0 - float(((p - y) ** 2).sum()) / sst

    def compute(self) -> dict:
        s = self.s
        n = s["n"]
        if n == 0:
            nan = float("nan")
            return {"mae": nan, "rmse": nan, "bias": nan, "r2": nan, "block_r2": nan, "valid_pixels": 0}
        sst = s["y2"] - s["y"] ** 2 / n
        bp = np.concatenate(self.block_pred) if self.block_pred else np.zeros(0)
        bt = np.concatenate(self.block_true) if self.block_true else np.zeros(0)
        labels = [f"{self.bins[i]:g}-{self.bins[i + 1]:g}m" if i + 1 < len(self.bins) else f">={self.bins[i]:g}m"
                  for i in range(len(self.bins))]
        return {
            "mae": s["abs"] / n,
            "rmse": float(np.sqrt(s["sq"] / n)),
            "bias": s["err"] / n,
            "r2": (1.0 - s["sq"] / sst) if sst > 0 else float("nan"),
            "block_r2": self._r2(bp, bt),
            "n_blocks": int(bp.size),
            "nmae": (s["rel"] / s["n_rel"]) if s["n_rel"] else float("nan"),
            "tree_cover_iou": (100.0 * s["inter"] / s["union"]) if s["union"] else float("nan"),
            "mae_per_bin": {lab: (self.bin_abs[i] / self.bin_n[i] if self.bin_n[i] else None) for i, lab in enumerate(labels)},
            "valid_pixels": int(n),
        }


def classification_scores(scores: torch.Tensor, target: torch.Tensor, multilabel: bool) -> dict:
    """`scores` [N, K] (probabilities or logits), `target` [N] ints or [N, K] 0/1."""
    scores = torch.as_tensor(scores).float()
    target = torch.as_tensor(target)
    k = scores.shape[1]
    if multilabel:
        t = target.long()
        return {
            "f1_micro": 100.0 * float(multilabel_f1_score(scores, t, num_labels=k, threshold=0.5, average="micro")),
            "f1_macro": 100.0 * float(multilabel_f1_score(scores, t, num_labels=k, threshold=0.5, average="macro")),
        }
    pred = scores.argmax(1)
    return {"accuracy": 100.0 * float(multiclass_accuracy(pred, target.long(), num_classes=k, average="micro"))}
