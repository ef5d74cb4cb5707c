"""Canopy-height regression from paired RGB / canopy-height-model GeoTIFFs (docs/eo_data.md §4).

Dataset format (``root=``; plain GeoTIFF, readable with rasterio only)::

    <root>/dataset.json          optional: {"name", "gsd_m", "bands": ["red", "green", "blue", ...],
                                 "image_scale": 255 (divide pixel values by this to reach [0, 1]),
                                 "chm_units": "m", "chm_nodata": -9999, "max_height_m": 96,
                                 "splits": {"train": "splits/train.txt", ...}}
    <root>/splits/<split>.txt    one sample stem per line (default split names: train, val, test)
    <root>/images/<stem>.tif     C-band image (RGB by default), uint8 (or any dtype with image_scale)
    <root>/chm/<stem>.tif        1 band, float32 metres above ground, nodata (file's nodata, else
                                 chm_nodata) or NaN; same CRS, transform and height x width as the image
    <root>/valid/<stem>.tif      optional 1-band mask, non-zero = pixel is scored

A pair whose size, CRS or transform disagree, a missing file, or an image without a red/green/blue band
raises a `DataError` naming the files. Heights below 0 become 0 (Tolan et al.) and heights above
``max_height_m`` are clipped.

Protocol: frozen backbone on ``patch``-pixel windows (training windows do not overlap; evaluation
uses a sliding window with ``stride`` and averages overlaps), a linear head (or light decoder) on patch
tokens regressing standardised heights with an L1 loss on valid pixels, logits bilinearly upsampled
to pixels, predictions clamped at 0. Metrics on valid pixels of ``eval_split``: MAE, RMSE, bias, pixel
R², block R² (``block_size``-pixel blocks, ``border`` pixels dropped), nMAE, tree-cover IoU at
``tree_threshold_m`` and MAE per height bin.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from geodino.data.bands import missing_rgb, rgb_indices
from geodino.errors import DataError, GeodinoError
from geodino.eval.dense import DenseSpec
from geodino.eval.features import files_identity
from geodino.eval.tasks.common import evaluate_regression

log = logging.getLogger("geodino")


def read_meta(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


class CanopyTiles:
    def __init__(self, root: Path, split: str, meta: dict, max_height: float | None):
        self.root, self.split, self.meta, self.max_height = Path(root), split, meta, max_height
        rel = (meta.get("splits") or {}).get(split, f"splits/{split}.txt")
        self.split_file = self.root / rel
        if not self.split_file.is_file():
            raise DataError(f"split file {self.split_file} not found (expected <root>/splits/{split}.txt, one stem per line)")
        self.stems = [s.strip() for s in self.split_file.read_text().splitlines() if s.strip() and not s.startswith("#")]
        if not self.stems:
            raise DataError(f"{self.split_file}: no samples")
        self.bands = [str(b).lower() for b in meta.get("bands", ["red", "green", "blue"])]
        rgb = rgb_indices(self.bands)
        if rgb is None:
            raise DataError(f"{self.root / 'dataset.json'}: bands {self.bands} have no {missing_rgb(self.bands)[0]} band")
        self.rgb = list(rgb)
        self._checked: dict[int, tuple[int, int]] = {}

    def paths(self, i: int) -> tuple[Path, Path, Path | None]:
        stem = self.stems[i]
        img, chm = self.root / "images" / f"{stem}.tif", self.root / "chm" / f"{stem}.tif"
        valid = self.root / "valid" / f"{stem}.tif"
        for p in (img, chm):
            if not p.is_file():
                raise DataError(f"{p}: missing (sample '{stem}' listed in {self.split_file})")
        return img, chm, valid if valid.is_file() else None

    def files(self) -> list[Path]:
        out = []
        for i in range(len(self)):
            img, chm, val = self.paths(i)
            out += [img, chm] + ([val] if val else [])
        return out

    def __len__(self) -> int:
        return len(self.stems)

    def size(self, i: int) -> tuple[int, int]:
        if i in self._checked:
            return self._checked[i]
        import rasterio

        img_p, chm_p, val_p = self.paths(i)
        try:
            with rasterio.open(img_p) as img, rasterio.open(chm_p) as chm:
                if chm.count != 1:
                    raise DataError(f"{chm_p}: canopy height model must have 1 band, has {chm.count}")
                if img.count < max(self.rgb) + 1:
                    raise DataError(f"{img_p}: {img.count} band(s) but dataset.json lists {self.bands}")
                if (img.height, img.width) != (chm.height, chm.width):
                    raise DataError(f"{img_p} is {img.height}x{img.width} but {chm_p} is {chm.height}x{chm.width}")
                if img.crs != chm.crs:
                    raise DataError(f"{img_p} has CRS {img.crs} but {chm_p} has CRS {chm.crs}")
                if not img.transform.almost_equals(chm.transform):
                    raise DataError(f"{img_p} and {chm_p} have different geotransforms ({tuple(img.transform)[:6]} vs "
                                    f"{tuple(chm.transform)[:6]})")
                hw = (img.height, img.width)
            if val_p is not None:
                with rasterio.open(val_p) as v:
                    if (v.height, v.width) != hw:
                        raise DataError(f"{val_p} is {v.height}x{v.width} but {img_p} is {hw[0]}x{hw[1]}")
        except rasterio.errors.RasterioIOError as e:
            raise DataError(f"{img_p} / {chm_p}: not readable GeoTIFFs ({e})") from None
        self._checked[i] = hw
        return hw

    def _scale(self, data: np.ndarray, path: Path) -> np.ndarray:
        scale = self.meta.get("image_scale")
        if scale is None:
            if data.dtype == np.uint8:
                scale = 255.0
            else:
                raise DataError(f"{path}: {data.dtype} image; set image_scale in dataset.json (the divisor that maps "
                                f"pixel values to [0, 1])")
        return np.clip(data.astype(np.float32) / float(scale), 0.0, 1.0)

    def load(self, i: int) -> dict:
        import rasterio

        self.size(i)
        img_p, chm_p, val_p = self.paths(i)
        with rasterio.open(img_p) as src:
            image = self._scale(src.read(), img_p)[self.rgb]
        with rasterio.open(chm_p) as src:
            chm = src.read(1).astype(np.float32)
            nodata = src.nodata if src.nodata is not None else self.meta.get("chm_nodata")
        valid = np.isfinite(chm)
        if nodata is not None and np.isfinite(nodata):
            valid &= chm != np.float32(nodata)
        if val_p is not None:
            with rasterio.open(val_p) as src:
                valid &= src.read(1) != 0
        chm = np.where(valid, np.maximum(chm, 0.0), 0.0).astype(np.float32)
        if self.max_height:
            chm = np.minimum(chm, float(self.max_height))
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "target": torch.from_numpy(chm),
                "valid": torch.from_numpy(valid), "name": self.stems[i], "group": ""}


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
    common = dict(kind="reg", window=window, mean=list(contract.mean), std=list(contract.std), batch_size=int(t.batch_size),
                  num_workers=ctx.num_workers, progress=ctx.progress)
    dataset_id = {"name": meta.get("name", "canopy"), "root": str(root.resolve()),
                  "files": {train_split: files_identity(train.files()), eval_split: files_identity(evals.files())}}
    block = int(t.block_size)
    gsd = meta.get("gsd_m")
    res = evaluate_regression(
        ctx, extractor, train, evals, DenseSpec(stride=window, **common), DenseSpec(stride=stride, **common),
        dataset_id=dataset_id, transform={"scale": meta.get("image_scale", "uint8/255"), "max_height_m": max_h,
                                          "bands": [train.bands[i] for i in train.rgb]},
        train_split=train_split, eval_split=eval_split,
        metric_kwargs=dict(block_size=block, border=int(t.get("border", 3)), min_block_valid=float(t.get("min_block_valid", 0.5)),
                           threshold=float(t.get("tree_threshold_m", 2.0)), bins=list(t.get("height_bins") or [0, 5, 10, 20])),
    )
    first = next(iter(res["heads"]))
    r = res["heads"][first]
    return {
        "protocol": {"split": f"train on {train_split}, evaluate on {eval_split}", "window": window, "stride": stride,
                     "block_size_px": block, "block_size_m": (block * float(gsd)) if gsd else None,
                     "border_px": int(t.get("border", 3)), "heads": list(res["heads"]), "loss": "L1 on standardised heights",
                     "epochs": int(t.epochs), "lr": float(t.lr), "max_height_m": max_h},
        "mae": r["mae"], "rmse": r["rmse"], "bias": r["bias"], "r2": r["r2"], "block_r2": r["block_r2"],
        **res,
        "headline": {f"MAE m ({h})": v["mae"] for h, v in res["heads"].items()}
                    | {f"block R2 ({h})": v["block_r2"] for h, v in res["heads"].items()},
    }
