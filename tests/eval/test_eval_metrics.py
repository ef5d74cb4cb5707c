"""Metric correctness on constructed cases, kNN voting, sliding-window stitching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodino.eval.dense import DenseSpec, extract_windows, predict_tiles, starts, window_positions
from geodino.eval.features import FeatureCache
from geodino.models.extract import Extractor
from geodino.eval.metrics import RegressionMetric, SegmentationMetric, classification_scores
from geodino.eval.probes import knn_scores

# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------


def test_torchmetrics_macro_is_mean_over_classes_1_to_7_with_ignore_index_0():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 8, (4, 64, 64), generator=g)
    pred = torch.randint(0, 8, (4, 64, 64), generator=g)
    macro = MulticlassJaccardIndex(num_classes=8, ignore_index=0, average="macro")(pred, target)
    per = MulticlassJaccardIndex(num_classes=8, ignore_index=0, average="none")(pred, target)
    assert float(macro) == pytest.approx(float(per[1:].mean()), abs=1e-6)
    # and by hand from the confusion matrix of labelled pixels
    keep = target != 0
    ious = []
    for c in range(1, 8):
        p, t = pred[keep] == c, target[keep] == c
        ious.append((p & t).sum().item() / (p | t).sum().item())
    assert float(macro) == pytest.approx(np.mean(ious), abs=1e-6)


def test_perfect_prediction_gives_100_miou():
    t = torch.randint(1, 8, (2, 32, 32))
    t[:, :3] = 0  # no-data rows
    m = SegmentationMetric(8, ignore_index=0)
    m.update(t.clone(), t)
    r = m.compute()
    assert r["miou"] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in r["per_class_iou"].values() if v is not None)
    assert "no-data" not in r["per_class_iou"] and "0" not in r["per_class_iou"]


def test_known_confusion_gives_hand_computed_iou():
    # target: 4 pixels of class 1, 4 of class 2, 2 no-data; pred: one class-1 pixel called 2,
    # the no-data pixels predicted as 1 (must not count).
    target = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2, 0, 0])
    pred = torch.tensor([1, 1, 1, 2, 2, 2, 2, 2, 1, 1])
    m = SegmentationMetric(3, ignore_index=0, class_names=["nodata", "a", "b"])
    m.update(pred, target)
    r = m.compute()
    iou_a = 3 / 4          # tp 3, fp 0, fn 1
    iou_b = 4 / 5          # tp 4, fp 1, fn 0
    assert r["per_class_iou"]["a"] == pytest.approx(100 * iou_a)
    assert r["per_class_iou"]["b"] == pytest.approx(100 * iou_b)
    assert r["miou"] == pytest.approx(100 * (iou_a + iou_b) / 2)
    assert r["labelled_pixels"] == 8


def test_no_data_pixels_are_ignored_whatever_is_predicted():
    target = torch.tensor([[0, 0, 1, 2], [0, 3, 3, 2]])
    pred_a = torch.tensor([[5, 6, 1, 2], [7, 3, 3, 2]])
    pred_b = torch.tensor([[1, 1, 1, 2], [2, 3, 3, 2]])
    ra, rb = SegmentationMetric(8, 0), SegmentationMetric(8, 0)
    ra.update(pred_a, target)
    rb.update(pred_b, target)
    assert ra.compute()["miou"] == pytest.approx(100.0)
    assert rb.compute()["miou"] == pytest.approx(100.0)
    # padding (-1) is dropped too
    rc = SegmentationMetric(8, 0)
    rc.update(torch.tensor([4, 1]), torch.tensor([-1, 1]))
    assert rc.compute()["miou"] == pytest.approx(100.0)


def test_exclude_from_mean_drops_a_class_from_the_mean_only():
    target = torch.tensor([1, 1, 2, 2])
    pred = torch.tensor([0, 1, 2, 2])  # a pixel wrongly called class 0
    m = SegmentationMetric(3, None, exclude_from_mean=[0])
    m.update(pred, target)
    r = m.compute()
    assert r["per_class_iou"]["0"] == pytest.approx(0.0)
    assert r["miou"] == pytest.approx(100 * (0.5 + 1.0) / 2)


# ----------------------------------------------------------------------------------------------
# Regression
# ----------------------------------------------------------------------------------------------


def test_perfect_regression_gives_zero_mae_and_unit_r2():
    y = torch.rand(64, 64) * 30
    m = RegressionMetric(block_size=8, border=3)
    m.update(y.clone(), y)
    r = m.compute()
    assert r["mae"] == pytest.approx(0.0, abs=1e-9)
    assert r["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert r["bias"] == pytest.approx(0.0, abs=1e-9)
    assert r["r2"] == pytest.approx(1.0)
    assert r["block_r2"] == pytest.approx(1.0)
    assert r["tree_cover_iou"] == pytest.approx(100.0)


def test_regression_hand_computed_and_nodata_ignored():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    p = torch.tensor([[2.0, 2.0], [1.0, 100.0]])
    valid = torch.tensor([[True, True], [True, False]])
    m = RegressionMetric(block_size=1, border=0, threshold=2.0, bins=[0, 2])
    m.update(p, y, valid)
    r = m.compute()
    e = np.array([1.0, 0.0, -2.0])
    yy = np.array([1.0, 2.0, 3.0])
    assert r["mae"] == pytest.approx(np.abs(e).mean())
    assert r["rmse"] == pytest.approx(math.sqrt((e ** 2).mean()))
    assert r["bias"] == pytest.approx(e.mean())
    assert r["r2"] == pytest.approx(1 - (e ** 2).sum() / ((yy - yy.mean()) ** 2).sum())
    assert r["nmae"] == pytest.approx((0 / 2 + 2 / 3) / 2)
    assert r["mae_per_bin"]["0-2m"] == pytest.approx(1.0)
    assert r["mae_per_bin"][">=2m"] == pytest.approx(1.0)
    assert r["valid_pixels"] == 3


def test_block_r2_pools_blocks_after_the_border():
    y = torch.zeros(20, 20)
    y[3:10, 3:10], y[10:17, 10:17] = 10.0, 20.0
    p = y + 1.0  # constant offset: pixel R² < 1 but block means are offset too
    m = RegressionMetric(block_size=7, border=3)
    m.update(p, y)
    r = m.compute()
    assert r["n_blocks"] == 4
    blocks_y = np.array([10.0, 0.0, 0.0, 20.0])
    assert r["block_r2"] == pytest.approx(1 - 4 * 1.0 / ((blocks_y - blocks_y.mean()) ** 2).sum())


# ----------------------------------------------------------------------------------------------
# Classification and kNN
# ----------------------------------------------------------------------------------------------


def test_classification_scores():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert classification_scores(scores, torch.tensor([0, 1, 1, 1]), False)["accuracy"] == pytest.approx(75.0)
    ml = classification_scores(torch.tensor([[0.9, 0.2], [0.8, 0.7]]), torch.tensor([[1, 0], [0, 1]]), True)
    # tp 2, fp 1, fn 0 -> micro F1 = 2*2 / (2*2 + 1) = 0.8
    assert ml["f1_micro"] == pytest.approx(80.0)


def test_knn_is_temperature_weighted_cosine_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    q = torch.tensor([[0.6, 0.8]])
    s = knn_scores(train, labels, q, n_classes=2, k=3, temperature=0.07)
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(q, dim=1).T
    w = (sims[:, 0] / 0.07).exp()
    expected1 = w[2] / w.sum()
    assert float(s[0, 1]) == pytest.approx(float(expected1), rel=1e-5)
    assert s.sum().item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Windows and stitching
# ----------------------------------------------------------------------------------------------


def test_window_positions_cover_the_tile():
    assert starts(1024, 512, 256) == [0, 256, 512]
    assert starts(40, 32, 16) == [0, 8]
    assert starts(20, 32, 16) == [0]
    assert len(window_positions(1024, 1024, 512, 256)) == 9


class _Tiles:
    def __init__(self, kind="seg"):
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.items = []
        for h, w in ((48, 40), (20, 36)):
            img = torch.rand(3, h, w, generator=g)
            if kind == "seg":
                tgt = torch.randint(0, 4, (h, w), generator=g)
                self.items.append({"image": img, "target": tgt, "name": f"{h}x{w}", "group": "a"})
            else:
                tgt = torch.rand(h, w, generator=g) * 20
                valid = torch.rand(h, w, generator=g) > 0.2
                self.items.append({"image": img, "target": tgt, "valid": valid, "name": f"{h}x{w}", "group": ""})

    def __len__(self):
        return len(self.items)

    def size(self, i):
        return tuple(self.items[i]["image"].shape[-2:])

    def load(self, i):
        return self.items[i]


@pytest.mark.parametrize("kind", ["seg", "reg"])
def test_sliding_window_stitching_with_an_oracle_head_is_exact(kind):
    from geodino.models import load_backbone

    tiles = _Tiles(kind)
    ex = Extractor(load_backbone("geodino_vit_tiny"), torch.device("cpu"))
    spec = DenseSpec(kind=kind, window=32, stride=16, batch_size=3)
    fs = extract_windows(ex, tiles, spec, FeatureCache(None), "test", "k")
    assert fs["feats"].shape[1:] == (96, 2, 2)
    targets = fs["targets"]
    pos = {"i": 0}

    def oracle(x, size):  # returns the stored window truth, batch by batch, in order
        i = pos["i"]
        t = torch.from_numpy(np.array(targets[i:i + len(x)]))
        pos["i"] += len(x)
        if kind == "seg":
            return torch.nn.functional.one_hot(t.long().clamp_min(0), 4).permute(0, 3, 1, 2).float()
        return t.float()[:, None]

    if kind == "seg":
        m = SegmentationMetric(4, None)
        for r in predict_tiles(fs, oracle, 4, batch_size=2):
            assert torch.equal(r["output"].argmax(0), r["target"])
            m.update(r["output"].argmax(0), r["target"])
        assert m.compute()["miou"] == pytest.approx(100.0)
    else:
        m = RegressionMetric(block_size=8, border=0)
        for r in predict_tiles(fs, oracle, 1, batch_size=2):
            assert r["output"].shape[1:] == r["target"].shape
            m.update(r["output"][0], r["target"], r["valid"])
            assert torch.equal(r["valid"], tiles.items[r["tile"]]["valid"])
        assert m.compute()["mae"] == pytest.approx(0.0, abs=1e-6)
