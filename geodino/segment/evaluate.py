"""``geodino eval ov``: open-vocabulary segmentation of a dino.txt model scored against per-pixel labels.

    geodino eval ov root=<labelled folder> backbone=<stage=text run | dino.txt model file>
    geodino eval ov backbone=<run>      # without root=: the packaged sample (geodino/data/sample/ov)

The folder holds class names, GeoTIFFs and label rasters (geodino.eval.datasets.ov_folder). Every image is
segmented as ``geodino segment`` / `OpenVocabSegmenter` does (bands mapped by name, the checkpoint's scale and
normalisation, tiles of ``task.tile`` blended), with the class names (or ``task.prompts``) as prompts, and scored
on the labelled, valid pixels with torchmetrics (geodino.eval.metrics.SegmentationMetric):

* **the model** with the ``task.templates`` ensemble: mIoU, pixel accuracy, per-class IoU (the headline);
* **template sensitivity**: mIoU and pixel accuracy of every template of that set used alone, and their spread;
* **majority-class floor**: every pixel labelled with the most frequent class of these labels (an optimistic floor:
  the majority is read off the evaluated labels themselves);
* **untrained-text-tower floor**: the same vision side with the text tower at a fresh (seeded) initialisation, i.e.
  what the image features and prompt wording give without any text alignment.

All variants share one image forward per tile: their class embeddings are stacked, each variant's class
probabilities (softmax within its classes) are blended across tiles as `OpenVocabSegmenter.segment` blends them,
and the label is their argmax -- so the headline labels are exactly those `segment` gives. It runs inside the eval suite's run skeleton
(geodino.eval.run: results.json, report.md, config.yaml, run.log); it lives here, above geodino.eval, because it
needs the segmenter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import open_dict

from geodino.data.sample import sample_ov_dir
from geodino.errors import GeodinoError
from geodino.eval.datasets.ov_folder import find_pairs, read_class_names, read_labels
from geodino.eval.metrics import SegmentationMetric
from geodino.eval.run import run_eval
from geodino.models.registry import is_arch
from geodino.segment.open_vocab import OpenVocabSegmenter, resolve_templates
from geodino.segment.tiling import blend_tiles
from geodino.text.dinotxt import build_text_tower

log = logging.getLogger("geodino")

ENSEMBLE = "ensemble"
UNTRAINED = "untrained_text_tower"


def run_ov_eval(cfg) -> dict:
    """``geodino eval ov``: the eval suite's run with this task (see module doc). Without ``root=`` it scores the
    packaged sample (geodino.data.sample.sample_ov_dir: the Sentinel-2 sample's bottom half, labelled by the
    stated NDWI / NDVI rule; the caption sample comes from the top half)."""
    _check_backbone(cfg)
    if cfg.get("root") in (None, "", "null"):
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.root = str(sample_ov_dir())
        log.info("geodino eval ov: no root=, scoring the packaged sample %s", cfg.root)
    return run_eval(cfg, runner=run)


def _check_backbone(cfg) -> str:
    name = str(cfg.backbone)
    if is_arch(name) or not Path(name).expanduser().exists():
        raise GeodinoError(f"geodino eval ov scores a dino.txt model: set backbone=<stage=text run directory or "
                           f"dino.txt model file> (got backbone={name})")
    return name


def _segmenter(ctx) -> OpenVocabSegmenter:
    name = _check_backbone(ctx.cfg)
    t = ctx.task
    return OpenVocabSegmenter.from_checkpoint(name, device=ctx.device, tile=int(t.get("tile", 512)),
                                              overlap=int(t.get("overlap", 64)))


def untrained_text_tower(seg: OpenVocabSegmenter, seed: int) -> torch.nn.Module:
    """A text tower of the model's configuration at a fresh initialisation (seeded): the untrained-text floor."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        return build_text_tower(seg.model.cfg).to(seg.device).eval()
    finally:
        torch.random.set_rng_state(state)


def run(ctx) -> dict:
    t = ctx.task
    root = ctx.root
    seg = _segmenter(ctx)
    names = read_class_names(root)
    pairs = find_pairs(root)
    k = len(names)
    prompts = [str(p) for p in t.prompts] if t.get("prompts") else list(names)
    if len(prompts) != k:
        raise GeodinoError(f"task.prompts has {len(prompts)} prompts for the {k} classes of {root} ({', '.join(names)})")
    ignore = t.get("ignore_value", 255)
    templates = resolve_templates(t.get("templates", "default"))

    # the variants: name -> (K, E') class embeddings
    variants = {ENSEMBLE: seg.text_embeddings(prompts, templates)}
    if len(templates) > 1:
        for tmpl in templates:
            variants[f"template: {tmpl}"] = seg.text_embeddings(prompts, [tmpl])
    variants[UNTRAINED] = seg.text_embeddings(prompts, templates, text_model=untrained_text_tower(seg, ctx.seed))
    text_all = torch.cat(list(variants.values()))
    metrics = {v: SegmentationMetric(k, class_names=names) for v in variants}
    targets: list[np.ndarray] = []
    counts = np.zeros(k, np.int64)

    for item in pairs:
        x, valid, _ = seg.load_image(item.image)
        _, h, w = x.shape
        target = read_labels(item, k, (h, w), ignore_index=None if ignore is None else int(ignore))
        target[~valid] = -1
        probs = np.zeros((len(variants) * k, h, w), np.float32)

        def read(y, x0, th, tw):
            return x[:, y:y + th, x0:x0 + tw], valid[y:y + th, x0:x0 + tw]

        def predict(img, v):  # per-variant class probabilities, blended across tiles as `segment` blends them
            sim = seg.patch_similarity(img if isinstance(img, torch.Tensor) else torch.from_numpy(img), v, text_all)
            return sim.view(len(variants), k, *sim.shape[1:]).softmax(1).reshape(sim.shape).cpu()

        def emit(y, x0, out, v):
            probs[:, y:y + out.shape[1], x0:x0 + out.shape[2]] = out

        blend_tiles(h, w, seg.tile, seg.overlap, read, predict, emit, blend=seg.blend)
        tgt = torch.from_numpy(target)
        for i, v in enumerate(variants):
            metrics[v].update(torch.from_numpy(probs[i * k:(i + 1) * k].argmax(0)), tgt)
        counts += np.bincount(target[target >= 0], minlength=k)[:k]
        targets.append(target.astype(np.int16))

    if counts.sum() == 0:
        raise GeodinoError(f"no labelled valid pixel in {root} (every label is ignored or nodata)")
    scores = {v: m.compute() for v, m in metrics.items()}

    majority = int(counts.argmax())
    floor = SegmentationMetric(k, class_names=names)
    for target in targets:  # a constant prediction, scored like the model (torchmetrics)
        floor.update(torch.full(target.shape, majority), torch.from_numpy(target.astype(np.int64)))
    majority_scores = {**floor.compute(), "class": names[majority]}

    head = scores[ENSEMBLE]
    per_template = {v.split(": ", 1)[1]: {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"]}
                    for v, s in scores.items() if v.startswith("template: ")}
    mious = [s["miou"] for s in per_template.values()]
    sensitivity = ({"min_miou": min(mious), "max_miou": max(mious), "spread_miou": max(mious) - min(mious),
                    "best": max(per_template, key=lambda p: per_template[p]["miou"]),
                    "worst": min(per_template, key=lambda p: per_template[p]["miou"])} if mious else {})
    untrained = scores[UNTRAINED]
    log.info("ov: mIoU %.2f (majority-class floor %.2f, untrained text tower %.2f); templates alone %s", head["miou"],
             majority_scores["miou"], untrained["miou"],
             f"{sensitivity['min_miou']:.2f}-{sensitivity['max_miou']:.2f}" if sensitivity else "n/a")
    return {
        "protocol": {"classes": names, "prompts": prompts, "templates": list(templates), "images": len(pairs),
                     "tile": seg.tile, "overlap": seg.overlap, "ignore_value": ignore,
                     "labelled_pixels_per_class": {n: int(c) for n, c in zip(names, counts)},
                     "majority_class": names[majority] + " (most frequent in these labels)",
                     "untrained_text_seed": ctx.seed, "random_backbone": bool(seg.info.get("random_backbone"))},
        "miou": head["miou"], "pixel_accuracy": head["pixel_accuracy"], "per_class_iou": head["per_class_iou"],
        "classes_in_mean": head["classes_in_mean"],
        "templates": per_template,
        "template_sensitivity": sensitivity,
        "floors": {"majority_class": majority_scores,
                   "untrained_text_tower": {key: untrained[key] for key in ("miou", "pixel_accuracy", "per_class_iou")}},
        "headline": {"mIoU": head["miou"], "pixel acc": head["pixel_accuracy"],
                     "majority-class mIoU": majority_scores["miou"], "untrained-text mIoU": untrained["miou"]},
    }
