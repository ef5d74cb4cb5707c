"""PNG figures for eval reports: [input | truth | prediction] for class maps and height maps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from geodino.eval.report import _to_uint8_rgb

# LoveDA-like colours for up to 8 classes, then a deterministic pseudo-random palette.
_BASE = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0),
         (255, 195, 128)]


def palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(12345)
    extra = rng.integers(30, 256, size=(max(0, n - len(_BASE)), 3))
    return np.concatenate([np.array(_BASE[:n], dtype=np.uint8).reshape(-1, 3), extra.astype(np.uint8)])[:n]


def _ramp(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> a dark-blue / green / yellow ramp (H, W, 3) uint8."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    x = np.clip(x, 0, 1) * (len(stops) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def _row(panels: Sequence[np.ndarray], out: str | Path, scale: int) -> Path:
    from PIL import Image

    ims = [Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST) for p in panels]
    w = sum(im.width for im in ims) + 8 * (len(ims) - 1)
    canvas = Image.new("RGB", (w, max(im.height for im in ims)), (255, 255, 255))
    x = 0
    for im in ims:
        canvas.paste(im, (x, 0))
        x += im.width + 8
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _scale_for(h: int) -> int:
    return max(1, min(8, 256 // max(1, h)))


def class_map_png(image01: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, n_classes: int, out: str | Path,
                  ignore_index: int | None = None) -> Path:
    """[RGB | true classes | predicted classes]; ignored / padded truth pixels are drawn black."""
    pal = palette(max(n_classes, 2))
    t = target.long().numpy()
    p = pred.long().clamp(0, n_classes - 1).numpy()
    tv = pal[np.clip(t, 0, n_classes - 1)]
    bad = t < 0 if ignore_index is None else (t < 0) | (t == ignore_index)
    tv[bad] = 0
    rgb = _to_uint8_rgb(image01.float(), None)
    return _row([rgb, tv, pal[p]], out, _scale_for(t.shape[0]))


def height_map_png(image01: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor | None,
                   out: str | Path, vmax: float | None = None) -> Path:
    """[RGB | true heights | predicted heights] on the same colour ramp; nodata black."""
    t = target.float().numpy()
    p = pred.float().numpy()
    v = np.ones_like(t, dtype=bool) if valid is None else valid.bool().numpy()
    top = vmax or max(1e-6, float(np.nanmax(np.where(v, t, 0))) if v.any() else 1.0, float(p.max()) if p.size else 1.0)
    tv = _ramp(np.where(v, t, 0) / top)
    tv[~v] = 0
    rgb = _to_uint8_rgb(image01.float(), None)
    return _row([rgb, tv, _ramp(p / top)], out, _scale_for(t.shape[0]))
