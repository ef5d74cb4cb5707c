"""``geodino segment checkpoint=<text run> input=<GeoTIFF> prompts=[...] out=<GeoTIFF>``.

Tiled open-vocabulary segmentation of a raster of any size in bounded memory: input windows are read with
rasterio, tiles are blended with ramp weights (geodino.segment.tiling) and every finished cell is written to the
output GeoTIFF as soon as it is final -- the full-resolution score stack never exists. GDAL's block cache is capped
(``gdal_cache_mb``) so reading and writing stay bounded too.

Output GeoTIFF (same CRS, transform and size as the input; deflate): a Cloud-Optimized GeoTIFF by default (GDAL's
COG driver: 256-pixel internal tiles, nearest-neighbour overviews, header first), ``format=gtiff`` a plain tiled
GeoTIFF without overviews. The labels stream into a tiled GeoTIFF first; the COG is GDAL's copy of it (so a COG
needs about twice the output's size on disk while it is made):

* band 1 ``labels`` (uint8, colour table): 1..K = the prompts in order, K+1 = background (when ``background`` is
  set), and the nodata value where the input is nodata. The input's nodata value is kept when it fits uint8 and
  is not a label value (e.g. 0 or 255); otherwise 0 is used and the input value is recorded in the tags. The
  values come from ``geodino.segment.open_vocab.file_labels``, the one mapping from the Python API's labels
  (0..K-1, -1 background, -2 nodata), so ``OpenVocabSegmenter.segment(...).file_labels()`` gives the same raster;
* band 2 ``score`` (optional, ``scores=true``): the winning-class probability as uint8 1..254 with GDAL
  scale/offset so that ``value * scale + offset`` is the probability;
* tags: ``CLASSES`` (JSON list), ``CLASS_<value>``, the checkpoint, templates and background threshold.

Beside it, for ``out=<stem>.tif``: ``<stem>.preview.png``, a downsampled colour preview with a legend,
``<stem>.summary.json`` with the legend, pixel counts per class and timings, and with ``vector=true``
``<stem>.gpkg``, the labels as polygons (one per connected region; ``value``, ``class``) in the raster's CRS, made
by GDAL's polygonize (``rasterio.features.shapes`` over the written band, scanline by scanline) and written by
geopandas (an optional dependency: ``pip install geopandas``). ``out`` must end in ``.tif`` /
``.tiff``; no output may be the input raster or the checkpoint, and an existing output is replaced only with
``overwrite=true`` (checked before the model runs). Every file is written to a temporary name and renamed when
complete; a failed run leaves no partial file and no empty output folder (geodino.outputs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Sequence

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


# Conventional land-cover colours, matched on the start of a word of the class name (in this order, so "dense
# vegetation" is forest green and "bare or built-up land" is tan); a name that matches nothing, or whose colour an
# earlier class took, gets the next free colour of _COLOURS.
CONVENTIONAL_COLOURS: tuple[tuple[tuple[str, ...], tuple[int, int, int]], ...] = (
    (("water", "river", "lake", "sea", "ocean", "lagoon", "pond", "reservoir", "creek", "stream", "canal"), (30, 100, 220)),
    (("forest", "tree", "wood", "dense vegetation"), (20, 110, 40)),
    (("vegetation", "grass", "meadow", "field", "crop", "farm", "agricult", "pasture", "shrub", "cultivat"),
     (130, 200, 80)),
    (("bare", "soil", "sand", "desert", "barren", "rock", "beach", "dune"), (210, 180, 140)),
    (("built", "building", "urban", "road", "impervious", "settlement", "city", "house", "roof"), (96, 96, 96)),
    (("marsh", "wetland", "swamp", "bog"), (70, 160, 150)),
    (("snow", "ice", "glacier", "cloud"), (240, 248, 255)),
)


def conventional_colour(name: str) -> tuple[int, int, int] | None:
    """The conventional colour of a class name (water blue, vegetation green, bare tan, built grey, ...) or None."""
    low = str(name).lower()
    for words, colour in CONVENTIONAL_COLOURS:
        if any(re.search(rf"\b{re.escape(w)}", low) for w in words):
            return colour
    return None


def class_colours(classes: int | Sequence[str]) -> list[tuple[int, int, int]]:
    """One colour per class: conventional ones by name (CONVENTIONAL_COLOURS), else distinct palette colours
    (_COLOURS, then a seeded palette). An int means that many unnamed classes."""
    names = [None] * classes if isinstance(classes, int) else [str(c) for c in classes]
    out: list[tuple[int, int, int] | None] = []
    for n in names:
        c = conventional_colour(n) if n is not None else None
        out.append(c if c not in out else None)
    free = [c for c in _COLOURS if c not in out]
    rng = np.random.default_rng(7)
    for i, c in enumerate(out):
        if c is None:
            out[i] = free.pop(0) if free else tuple(int(v) for v in rng.integers(30, 256, 3))
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
    colours = class_colours(class_names)
    for i, c in enumerate(colours):
        lut[i + 1] = c
    if background:
        lut[k + 1] = BACKGROUND_RGB
    rgb = lut[labels]
    img = Image.fromarray(rgb)
    scale = max(1, 256 // max(1, max(labels.shape)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    entries = [(n, colours[i]) for i, n in enumerate(class_names)]
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


FORMATS = ("cog", "gtiff")


def output_files(out: str | Path, input_path: str | Path, preview: bool = True, overwrite: bool = False,
                 checkpoint: str | Path | None = None, vector: bool = False) -> dict[str, Path]:
    """The files ``segment`` writes for ``out`` ({"labels", "summary"[, "preview"][, "vector"]}), refused (one line)
    before any work when ``out`` is not a GeoTIFF name or an output would overwrite the input, the checkpoint,
    another output or (without ``overwrite``) an existing file."""
    input_path = Path(str(input_path)).expanduser()
    out = Path(str(out)).expanduser()
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise GeodinoError(f"out={out}: the labels are written as a GeoTIFF, so out must end in .tif or .tiff "
                           f"(the preview and summary go beside it as <name>.preview.png and <name>.summary.json)")
    files = {"labels": out, "summary": out.with_name(f"{out.stem}.summary.json")}
    if preview:
        files["preview"] = out.with_name(f"{out.stem}.preview.png")
    if vector:
        files["vector"] = out.with_name(f"{out.stem}.gpkg")
    check_outputs(files.values(), [input_path, checkpoint], overwrite=overwrite, what="output")
    return files


def segment_raster(segmenter, input_path: str | Path, prompts, out: str | Path, background: float | None = None,
                   templates="default", tile: int = 512, overlap: int = 64, scores: bool = True,
                   preview: bool = True, preview_size: int = 1024, progress: bool = True, scale: float | None = None,
                   gdal_cache_mb: int = 64, compress: str = "deflate", overwrite: bool = False,
                   format: str = "cog", vector: bool = False) -> dict:
    """Segment a GeoTIFF window by window into ``out`` (see module doc); returns the summary dict. The streaming
    path for rasters of any size; ``OpenVocabSegmenter.segment`` holds the whole result in memory."""

    prompts = check_prompts(prompts)
    if format not in FORMATS:
        raise GeodinoError(f"format={format}: choose {' or '.join(FORMATS)} (cog: Cloud-Optimized GeoTIFF)")
    if vector:
        _require_geopandas()
    if background is not None and not 0.0 <= float(background) <= 1.0:
        raise GeodinoError(f"background is a probability threshold in [0, 1], got {background}")
    input_path = Path(str(input_path)).expanduser()
    if not input_path.is_file():
        raise DataError(f"input raster {input_path} does not exist")
    files = output_files(out, input_path, preview, overwrite, segmenter.info.get("checkpoint"), vector)
    out = files["labels"]
    with output_dir(out.parent), contextlib.ExitStack() as written:
        # every file goes to a temporary name; all are renamed at the end, or all removed on failure
        summary = _segment_into(segmenter, input_path, prompts, files, written, background, templates, tile,
                                overlap, scores, preview_size, progress, scale, gdal_cache_mb, compress, format)
    return summary


def _require_geopandas():
    try:
        import geopandas  # noqa: F401
    except ImportError as e:
        raise GeodinoError("vector=true writes a GeoPackage with geopandas, which is not installed: "
                           "pip install geopandas") from e


def write_cog(src: Path, dst: Path, compress: str = "deflate") -> None:
    """GDAL's COG copy of a tiled GeoTIFF: 256-pixel tiles, nearest-neighbour overviews (labels stay labels),
    colour table, nodata, band descriptions, scales / offsets and tags kept."""
    import rasterio.shutil

    rasterio.shutil.copy(str(src), str(dst), driver="COG", COMPRESS=compress.upper(), BLOCKSIZE=256,
                         OVERVIEW_RESAMPLING="NEAREST", BIGTIFF="IF_SAFER")


def write_polygons(labels_tif: Path, dst: Path, classes: dict[int, str], nodata) -> int:
    """The label band of `labels_tif` as polygons (``value``, ``class``) in a GeoPackage; returns their number.
    GDAL's polygonize reads the band itself, scanline by scanline (rasterio.features.shapes over a band)."""
    import geopandas as gpd
    from rasterio.features import shapes
    from shapely.geometry import shape

    with rasterio.open(labels_tif) as src:
        band = rasterio.band(src, 1)
        rows = [(shape(geom), int(v)) for geom, v in shapes(band) if nodata is None or int(v) != int(nodata)]
        crs = src.crs
    gdf = gpd.GeoDataFrame({"value": [v for _, v in rows], "class": [classes.get(v, "") for _, v in rows]},
                           geometry=[g for g, _ in rows], crs=crs)
    gdf.to_file(dst, driver="GPKG", layer="labels")
    return len(gdf)


def _segment_into(segmenter, input_path: Path, prompts: list[str], files: dict[str, Path], written, background,
                  templates, tile, overlap, scores, preview_size, progress, scale, gdal_cache_mb, compress,
                  format: str = "cog") -> dict:
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
            stream = tmp if format == "gtiff" else tmp.with_name(tmp.name + ".stream.tif")
            if stream != tmp:
                written.callback(lambda: stream.unlink(missing_ok=True))
            with rasterio.open(stream, "w", **profile) as dst:
                dst.descriptions = ("labels", "score")[: profile["count"]]
                cmap = {0: (0, 0, 0, 0)}
                for i, c in enumerate(class_colours(prompts)):
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
            if stream != tmp:
                write_cog(stream, tmp, compress)
                stream.unlink()
    classes = {i + 1: p for i, p in enumerate(prompts)} | ({k + 1: "background"} if bg else {})
    n_polygons = None
    if "vector" in files:
        n_polygons = write_polygons(tmp, written.enter_context(atomic_output(files["vector"])), classes, out_nodata)
    seconds = time.perf_counter() - t0
    summary = {
        "input": str(input_path), "out": str(out), "width": W, "height": H, "classes": prompts,
        "label_values": {p: i + 1 for i, p in enumerate(prompts)} | ({"background": k + 1} if bg else {}),
        "nodata": out_nodata, "pixels": {p: int(counts[i + 1]) for i, p in enumerate(prompts)}
        | ({"background": int(counts[k + 1])} if bg else {}) | {"nodata": int(counts[k + 2])},
        "seconds": seconds, "seconds_per_megapixel": seconds / max(H * W / 1e6, 1e-9), **stats, **notes,
        "format": format,
    }
    if n_polygons is not None:
        summary["vector"], summary["polygons"] = str(files["vector"]), n_polygons
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
    vector = bool(cfg.get("vector", False))
    fmt = str(cfg.get("format", "cog"))
    if fmt not in FORMATS:
        raise GeodinoError(f"format={fmt}: choose {' or '.join(FORMATS)} (cog: Cloud-Optimized GeoTIFF)")
    if vector:
        _require_geopandas()
    output_files(out, inp, preview, overwrite, str(cfg.checkpoint), vector)  # refused before the model loads
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
        format=fmt, vector=vector,
    )
    print(f"labels:  {summary['out']}  ({summary['width']}x{summary['height']}, {len(prompts)} classes, "
          f"{summary['seconds']:.1f} s, {summary['seconds_per_megapixel']:.2f} s/MP)")
    if "preview" in summary:
        print(f"preview: {summary['preview']}")
    if "vector" in summary:
        print(f"vector:  {summary['vector']}  ({summary['polygons']} polygons)")
    print(f"summary: {summary['summary']}")
    return summary
