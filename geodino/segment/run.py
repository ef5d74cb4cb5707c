"""``geodino segment checkpoint=<text run> input=<GeoTIFF> prompts=[...] out=<GeoTIFF>``.

Tiled open-vocabulary segmentation of a raster of any size in bounded memory: input windows are read with
rasterio, tiles are blended with ramp weights (geodino.segment.tiling) and every finished cell is written to the
output GeoTIFF as soon as it is final -- the full-resolution score stack never exists. GDAL's block cache is capped
(``gdal_cache_mb``) so reading and writing stay bounded too.

Output GeoTIFF (same CRS, transform and size as the input; tiled, deflate):

* band 1 ``labels`` (uint8, colour table): 1..K = the prompts in order, K+1 = background (when ``background`` is
  set), and the nodata value where the input is nodata. The input's nodata value is kept when it fits uint8 and
  is not a label value (e.g. 0 or 255); otherwise 0 is used and the input value is recorded in the tags. The
  values come from ``geodino.segment.open_vocab.file_labels``, the one mapping from the Python API's labels
  (0..K-1, -1 background, -2 nodata), so ``OpenVocabSegmenter.segment(...).file_labels()`` gives the same raster;
* band 2 ``score`` (optional, ``scores=true``): the winning-class probability as uint8 1..254 with GDAL
  scale/offset so that ``value * scale + offset`` is the probability;
* tags: ``CLASSES`` (JSON list), ``CLASS_<value>``, the checkpoint, templates and background threshold.

Beside it, for ``out=<stem>.tif``: ``<stem>.preview.png``, a downsampled colour preview with a legend, and
``<stem>.summary.json`` with the legend, pixel counts per class and timings. ``out`` must end in ``.tif`` /
``.tiff``; no output may be the input raster or the checkpoint, and an existing output is replaced only with
``overwrite=true`` (checked before the model runs). Every file is written to a temporary name and renamed when
complete; a failed run leaves no partial file and no empty output folder (geodino.outputs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import rasterio
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont
from rasterio.windows import Window

from geodino.data.geotiff import band_names, dataset_tags, pick_bands, resolve_scaling, valid_mask
from geodino.errors import DataError, GeodinoError
from geodino.outputs import atomic_output, check_outputs, output_dir, write_new
from geodino.runs import default_run_dir
from geodino.runtime import verb_setup
from geodino.segment.open_vocab import OpenVocabSegmenter, check_prompts, decide, file_labels, resolve_templates
from geodino.segment.tiling import blend_tiles

log = logging.getLogger("geodino")

# distinct colours for up to 20 classes (then a seeded palette); background grey, nodata transparent black
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
            (0, 0, 128), (255, 255, 255)]
BACKGROUND_RGB = (128, 128, 128)


def class_colours(n: int) -> list[tuple[int, int, int]]:
    out = list(_COLOURS[:n])
    rng = np.random.default_rng(7)
    while len(out) < n:
        out.append(tuple(int(v) for v in rng.integers(30, 256, 3)))
    return out


def label_values(n_classes: int, background: bool, in_nodata) -> tuple[int | None, dict]:
    """(output nodata value, notes). Labels are 1..K (+ K+1 for background)."""
    used = set(range(1, n_classes + 1 + (1 if background else 0)))
    if in_nodata is None:
        return None, {}
    if isinstance(in_nodata, float) and math.isnan(in_nodata):
        return 0, {"input_nodata": "nan"}
    if float(in_nodata).is_integer() and 0 <= in_nodata <= 255 and int(in_nodata) not in used:
        return int(in_nodata), {}
    return 0, {"input_nodata": float(in_nodata)}


def preview_png(labels: np.ndarray, class_names: list[str], out: Path, background: bool, nodata_value,
                title: str = "") -> Path:
    """Colour preview (label values 1..K, K+1 background, nodata) with a legend on the right."""

    k = len(class_names)
    lut = np.zeros((256, 3), np.uint8)
    for i, c in enumerate(class_colours(k)):
        lut[i + 1] = c
    if background:
        lut[k + 1] = BACKGROUND_RGB
    rgb = lut[labels]
    img = Image.fromarray(rgb)
    scale = max(1, 256 // max(1, max(labels.shape)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    entries = [(n, class_colours(k)[i]) for i, n in enumerate(class_names)]
    if background:
        entries.append(("background", BACKGROUND_RGB))
    if nodata_value is not None and (labels == nodata_value).any():
        entries.append(("nodata", (0, 0, 0)))
    row_h = 18
    legend_w = 24 + max(len(n) for n, _ in entries) * 7 + 16
    height = max(img.height, row_h * len(entries) + 28)
    canvas = Image.new("RGB", (img.width + legend_w + 8, height), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = img.width + 12
    draw.text((x0, 4), title[:40] or "legend", fill=(0, 0, 0), font=font)
    for r, (name, colour) in enumerate(entries):
        y = 24 + r * row_h
        draw.rectangle([x0, y, x0 + 14, y + 12], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x0 + 20, y), name, fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def output_files(out: str | Path, input_path: str | Path, preview: bool = True, overwrite: bool = False,
                 checkpoint: str | Path | None = None) -> dict[str, Path]:
    """The files ``segment`` writes for ``out`` ({"labels", "summary"[, "preview"]}), refused (one line) before any
    work when ``out`` is not a GeoTIFF name or an output would overwrite the input, the checkpoint, another output
    or (without ``overwrite``) an existing file."""
    input_path = Path(str(input_path)).expanduser()
    out = Path(str(out)).expanduser()
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise GeodinoError(f"out={out}: the labels are written as a GeoTIFF, so out must end in .tif or .tiff "
                           f"(the preview and summary go beside it as <name>.preview.png and <name>.summary.json)")
    files = {"labels": out, "summary": out.with_name(f"{out.stem}.summary.json")}
    if preview:
        files["preview"] = out.with_name(f"{out.stem}.preview.png")
    check_outputs(files.values(), [input_path, checkpoint], overwrite=overwrite, what="output")
    return files


def segment_raster(segmenter, input_path: str | Path, prompts, out: str | Path, background: float | None = None,
                   templates="default", tile: int = 512, overlap: int = 64, scores: bool = True,
                   preview: bool = True, preview_size: int = 1024, progress: bool = True, scale: float | None = None,
                   gdal_cache_mb: int = 64, compress: str = "deflate", overwrite: bool = False) -> dict:
    """Segment a GeoTIFF window by window into ``out`` (see module doc); returns the summary dict."""

    prompts = check_prompts(prompts)
    if background is not None and not 0.0 <= float(background) <= 1.0:
        raise GeodinoError(f"background is a probability threshold in [0, 1], got {background}")
    input_path = Path(str(input_path)).expanduser()
    if not input_path.is_file():
        raise DataError(f"input raster {input_path} does not exist")
    files = output_files(out, input_path, preview, overwrite, segmenter.info.get("checkpoint"))
    out = files["labels"]
    with output_dir(out.parent), contextlib.ExitStack() as written:
        # every file goes to a temporary name; all are renamed at the end, or all removed on failure
        summary = _segment_into(segmenter, input_path, prompts, files, written, background, templates, tile,
                                overlap, scores, preview_size, progress, scale, gdal_cache_mb, compress)
    return summary


def _segment_into(segmenter, input_path: Path, prompts: list[str], files: dict[str, Path], written, background,
                  templates, tile, overlap, scores, preview_size, progress, scale, gdal_cache_mb, compress) -> dict:
    out = files["labels"]
    t0 = time.perf_counter()
    text = segmenter.text_embeddings(prompts, templates)
    predict = segmenter.predictor(text)
    k = len(prompts)
    bg = background is not None
    counts = np.zeros(k + 3, np.int64)  # per label value 0..k+1, and nodata at k+2

    with rasterio.Env(GDAL_CACHEMAX=int(gdal_cache_mb) * 1024 * 1024):
        try:
            src = rasterio.open(input_path)
        except Exception as e:
            raise DataError(f"cannot open raster {input_path}: {e}") from e
        with src:
            idx = pick_bands(band_names(src), segmenter.bands, src.count, str(input_path))
            bands = [i + 1 for i in idx]
            in_nodata = src.nodata
            H, W = src.height, src.width
            out_nodata, notes = label_values(k, bg, in_nodata)
            scaling = resolve_scaling(input_path, src.dtypes[idx[0]], dataset_tags(src, bands),
                                      scale if scale is not None else segmenter.scale, segmenter.offset,
                                      segmenter.contract.offset)
            profile = dict(driver="GTiff", dtype="uint8", count=2 if scores else 1, width=W, height=H, crs=src.crs,
                           transform=src.transform, nodata=out_nodata, tiled=True, blockxsize=256, blockysize=256,
                           compress=compress, BIGTIFF="IF_SAFER", interleave="band")
            f = max(1, math.ceil(max(H, W) / preview_size))
            prev = np.full((math.ceil(H / f), math.ceil(W / f)), 0 if out_nodata is None else out_nodata, np.uint8)

            def read(y, x, h, w):
                arr = src.read(bands, window=Window(x, y, w, h))
                valid = valid_mask(arr, in_nodata)
                x01 = scaling.apply(arr.astype(np.float32))
                x01[:, ~valid] = 0.0
                return x01, valid

            tmp = written.enter_context(atomic_output(out, needs_bytes=H * W * profile["count"]))
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.descriptions = ("labels", "score")[: profile["count"]]
                cmap = {0: (0, 0, 0, 0)}
                for i, c in enumerate(class_colours(k)):
                    cmap[i + 1] = (*c, 255)
                if bg:
                    cmap[k + 1] = (*BACKGROUND_RGB, 255)
                if out_nodata is not None:
                    cmap[out_nodata] = (0, 0, 0, 0)
                dst.write_colormap(1, cmap)

                nod = 0 if out_nodata is None else out_nodata

                def emit(y, x, probs, valid):
                    lab, sc = decide(probs, valid, background)
                    out_lab = file_labels(lab, k, nod)  # 1..K, K+1 background, nodata (open_vocab docstring)
                    h, w = out_lab.shape
                    win = Window(x, y, w, h)
                    dst.write(out_lab, 1, window=win)
                    if scores:
                        sc_u8 = (1 + np.round(np.clip(sc, 0, 1) * 253)).astype(np.uint8)
                        sc_u8[~valid] = nod
                        dst.write(sc_u8, 2, window=win)
                    counts[:] += np.bincount(np.where(valid, out_lab, k + 2).ravel(), minlength=k + 3)[: k + 3]
                    oy, ox = (-y) % f, (-x) % f
                    sub = out_lab[oy::f, ox::f]
                    if sub.size:
                        py, px = (y + oy) // f, (x + ox) // f
                        prev[py:py + sub.shape[0], px:px + sub.shape[1]] = sub

                stats = blend_tiles(H, W, int(tile), int(overlap), read, predict, emit, blend=segmenter.blend,
                                    progress=progress, desc=f"segment {input_path.name}")
                tags = {"CLASSES": json.dumps(prompts), "BACKGROUND_THRESHOLD": "" if background is None else str(background),
                        "BACKGROUND_VALUE": str(k + 1) if bg else "",
                        "TEMPLATES": json.dumps(list(resolve_templates(templates))),
                        "CHECKPOINT": str(segmenter.info.get("checkpoint", "")),
                        "SCORE_ENCODING": "probability = (value - 1) / 253" if scores else ""}
                tags.update({f"CLASS_{i + 1}": p for i, p in enumerate(prompts)})
                tags.update({k_.upper(): str(v) for k_, v in notes.items()})
                dst.update_tags(**tags)
                if scores:
                    dst.scales = (1.0, 1.0 / 253)
                    dst.offsets = (0.0, -1.0 / 253)
    seconds = time.perf_counter() - t0
    summary = {
        "input": str(input_path), "out": str(out), "width": W, "height": H, "classes": prompts,
        "label_values": {p: i + 1 for i, p in enumerate(prompts)} | ({"background": k + 1} if bg else {}),
        "nodata": out_nodata, "pixels": {p: int(counts[i + 1]) for i, p in enumerate(prompts)}
        | ({"background": int(counts[k + 1])} if bg else {}) | {"nodata": int(counts[k + 2])},
        "seconds": seconds, "seconds_per_megapixel": seconds / max(H * W / 1e6, 1e-9), **stats, **notes,
    }
    if "preview" in files:
        preview_png(prev, prompts, written.enter_context(atomic_output(files["preview"])), bg, out_nodata,
                    title=input_path.name)
        summary["preview"] = str(files["preview"])
    summary["summary"] = str(files["summary"])
    if segmenter.info.get("random_backbone"):
        summary["random_backbone"] = True
    text = json.dumps(summary, indent=2)
    write_new(written.enter_context(atomic_output(files["summary"], needs_bytes=len(text))), text)
    return summary


def apply_head(checkpoint: str | Path, input_path: str | Path, out: str | Path, tile: int | None = None,
               overlap: int = 64, device: str = "cpu", **kwargs) -> dict:
    """Apply an eval head checkpoint (``geodino eval ... save_heads=true``) to a GeoTIFF: labels 1..K for its
    classes, same CRS / transform / size (`geodino.segment.heads`); returns the summary."""
    from geodino.segment.heads import DenseSegmenter

    seg = DenseSegmenter.from_checkpoint(checkpoint, device=device)
    tile = int(tile or seg.record.get("window") or 512)
    return segment_raster(seg, input_path, seg.class_names, out, tile=tile, overlap=overlap, **kwargs)


def _dense_head_checkpoint(path: str) -> dict | None:
    """The ``dense_head`` record when `path` is a head file written by ``geodino eval ... save_heads=true``."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    from geodino.checkpoint import Checkpoint

    try:
        return Checkpoint.open(p).get("dense_head")
    except Exception:  # not ours to judge here: the text-model loader reports unreadable files
        return None


def run_segment(cfg) -> dict:
    """`geodino segment checkpoint=... input=... prompts=[...] [out=...]`."""
    for key, example in (("checkpoint", "checkpoint=outputs/train/text/<run>"), ("input", "input=scene.tif")):
        if OmegaConf.is_missing(cfg, key):
            raise GeodinoError(f"segment needs {key}=...: e.g. geodino segment {example} prompts=[water,forest]")
    verb_setup(cfg)
    prompts = cfg.get("prompts")
    prompts = [prompts] if isinstance(prompts, str) else list(OmegaConf.to_container(prompts, resolve=True) or [])
    head = _dense_head_checkpoint(str(cfg.checkpoint))
    if head is not None and not prompts:
        prompts = [str(c) for c in (head.get("class_names") or [])]
    if not prompts:
        raise GeodinoError("segment needs class prompts: prompts=[building,road,water]")
    templates = cfg.get("templates", "default")
    if not isinstance(templates, str) and templates is not None:
        templates = list(OmegaConf.to_container(templates, resolve=True))
    inp = Path(str(cfg.input)).expanduser()
    if cfg.get("out"):
        out = Path(str(cfg.out)).expanduser()
    else:
        out = default_run_dir("segment", inp.stem) / f"{inp.stem}_segment.tif"
    preview = bool(cfg.get("preview", True))
    overwrite = bool(cfg.get("overwrite", False))
    output_files(out, inp, preview, overwrite, str(cfg.checkpoint))  # refused before the model loads
    if head is not None:  # an eval head (geodino eval ... save_heads=true): its classes, no text
        from geodino.segment.heads import DenseSegmenter

        seg = DenseSegmenter.from_checkpoint(str(cfg.checkpoint), device=str(cfg.get("device", "auto")),
                                             blend=str(cfg.get("blend", "linear")),
                                             **({"scale": float(cfg.scale)} if cfg.get("scale") is not None else {}))
    else:
        seg = OpenVocabSegmenter.from_checkpoint(
            str(cfg.checkpoint), device=str(cfg.get("device", "auto")),
            patch_features=str(cfg.get("patch_features", "head")), blend=str(cfg.get("blend", "linear")),
            **({"scale": float(cfg.scale)} if cfg.get("scale") is not None else {}),
        )
    summary = segment_raster(
        seg, inp, prompts, out, background=None if cfg.get("background") is None else float(cfg.background),
        templates=templates, tile=int(cfg.tile), overlap=int(cfg.overlap), scores=bool(cfg.get("scores", True)),
        preview=preview, preview_size=int(cfg.get("preview_size", 1024)),
        progress=bool(cfg.get("progress", True)), gdal_cache_mb=int(cfg.get("gdal_cache_mb", 64)), overwrite=overwrite,
    )
    print(f"labels:  {summary['out']}  ({summary['width']}x{summary['height']}, {len(prompts)} classes, "
          f"{summary['seconds']:.1f} s, {summary['seconds_per_megapixel']:.2f} s/MP)")
    if "preview" in summary:
        print(f"preview: {summary['preview']}")
    print(f"summary: {summary['summary']}")
    return summary
