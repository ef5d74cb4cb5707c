"""`geodino eval ov`: open-vocabulary segmentation scored against label rasters in a folder (classes.txt,
images/, labels/): mIoU, pixel accuracy, per-class IoU, the majority-class and untrained-text-tower floors and the
score of every template, on fake data in that layout with a micro dino.txt model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geodino import cli
from geodino.errors import DataError

CLASSES = ["water", "forest", "bare ground"]


def _folder(root, n=2, h=40, w=48, seed=0):
    from fakes.synthetic import write_geotiff

    rng = np.random.default_rng(seed)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("# label value = line\n" + "\n".join(CLASSES) + "\n")
    truth = []
    for i in range(n):
        img = rng.integers(1, 255, (4, h, w)).astype(np.uint8)
        img[:, :2, :2] = 0  # nodata corner (image nodata 0): never scored
        lab = np.zeros((h, w), np.uint8)
        lab[:, w // 2:] = 1
        lab[h // 2:, : w // 4] = 2
        lab[-3:, -3:] = 255  # ignored
        write_geotiff(root / "images" / f"s{i}.tif", img, bands=["NIR", "G", "R", "B"], nodata=0)
        write_geotiff(root / "labels" / f"s{i}.tif", lab[None], bands=["label"], nodata=None)
        truth.append((img, lab))
    return truth


def _run(tmp_path, root, backbone, *extra):
    rc = cli.main(["eval", "ov", f"root={root}", f"backbone={backbone}", f"run_dir={tmp_path / 'out'}",
                   "progress=false", "task.tile=32", "task.overlap=16", "threads=1", *extra])
    assert rc == 0
    return json.loads((tmp_path / "out" / "results.json").read_text())["results"]


def test_eval_ov_reports_scores_floors_and_template_sensitivity(tmp_path, micro4):
    from geodino.segment.open_vocab import OpenVocabSegmenter, resolve_templates

    root = tmp_path / "data"
    truth = _folder(root)
    res = _run(tmp_path, root, micro4)

    # the headline equals scoring OpenVocabSegmenter.segment's labels by hand (same tiles, same templates)
    seg = OpenVocabSegmenter.from_checkpoint(micro4, tile=32, overlap=16)
    inter, union, right, total = np.zeros(3), np.zeros(3), 0, 0
    counts = np.zeros(3)
    for i, (_, lab) in enumerate(truth):
        pred = seg.segment(root / "images" / f"s{i}.tif", CLASSES).labels
        keep = (lab != 255) & (pred >= 0)  # pred is NODATA (-2) at the nodata corner
        p, t = pred[keep], lab[keep].astype(int)
        for c in range(3):
            inter[c] += ((p == c) & (t == c)).sum()
            union[c] += ((p == c) | (t == c)).sum()
            counts[c] += (t == c).sum()
        right += (p == t).sum()
        total += t.size
    iou = inter / np.maximum(union, 1)
    assert res["miou"] == pytest.approx(100 * iou[union > 0].mean(), abs=1e-3)
    assert res["pixel_accuracy"] == pytest.approx(100 * right / total, abs=1e-3)
    assert res["per_class_iou"] == pytest.approx({c: 100 * v for c, v in zip(CLASSES, iou)}, abs=1e-3)
    assert res["protocol"]["labelled_pixels_per_class"] == {c: int(n) for c, n in zip(CLASSES, counts)}

    # majority-class floor: a constant prediction of the most frequent class
    major = int(counts.argmax())
    floor = res["floors"]["majority_class"]
    assert floor["class"] == CLASSES[major]
    assert floor["pixel_accuracy"] == pytest.approx(100 * counts[major] / counts.sum(), abs=1e-3)
    assert floor["miou"] == pytest.approx(100 * counts[major] / counts.sum() / 3, abs=1e-3)

    # untrained text tower and every template alone
    assert set(res["floors"]["untrained_text_tower"]) == {"miou", "pixel_accuracy", "per_class_iou"}
    assert list(res["templates"]) == list(resolve_templates("default"))
    mious = [v["miou"] for v in res["templates"].values()]
    sens = res["template_sensitivity"]
    assert sens["spread_miou"] == pytest.approx(max(mious) - min(mious))
    assert res["templates"][sens["best"]]["miou"] == max(mious)
    assert res["protocol"]["random_backbone"] is False
    report = (tmp_path / "out" / "report.md").read_text()
    assert "floors.majority_class.miou" in report and "template_sensitivity.spread_miou" in report


def test_eval_ov_single_template_and_prompts(tmp_path, micro4):
    root = tmp_path / "data"
    _folder(root, n=1)
    res = _run(tmp_path, root, micro4, "task.templates=none", "task.prompts=[lake,woodland,sand]")
    assert res["templates"] == {} and res["protocol"]["prompts"] == ["lake", "woodland", "sand"]
    assert 0.0 <= res["miou"] <= 100.0


def test_eval_ov_refuses_bad_folders_clearly(tmp_path, micro4, capsys):
    from fakes.synthetic import write_geotiff

    root = tmp_path / "data"
    _folder(root, n=1)
    write_geotiff(root / "labels" / "s0.tif", np.full((1, 40, 48), 7, np.uint8), bands=["label"], nodata=None)
    rc = cli.main(["eval", "ov", f"root={root}", f"backbone={micro4}", f"run_dir={tmp_path / 'o1'}", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "labels/s0.tif holds values [7] outside the 3 classes" in err
    assert not (tmp_path / "o1").exists()

    write_geotiff(root / "images" / "extra.tif", np.ones((4, 8, 8), np.uint8), bands=["NIR", "G", "R", "B"])
    rc = cli.main(["eval", "ov", f"root={root}", f"backbone={micro4}", f"run_dir={tmp_path / 'o2'}", "progress=false"])
    assert rc == 2 and "have no label raster" in capsys.readouterr().err

    rc = cli.main(["eval", "ov", f"root={root}", "backbone=geodino_vit_tiny", f"run_dir={tmp_path / 'o3'}",
                   "progress=false"])
    assert rc == 2 and "scores a dino.txt model" in capsys.readouterr().err

    from geodino.eval.datasets.ov_folder import read_class_names

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "classes.json").write_text('{"0": "water", "2": "forest"}')
    with pytest.raises(DataError, match="label values must be 0..1"):
        read_class_names(tmp_path / "c")
