"""PNG figures: the PCA of a backbone's patch features next to the input (the standard way DINO features are
inspected, DINOv2/v3 papers), and [input | truth | prediction] panels for class maps and height maps.

A neutral module: training writes ``pca_features.png`` at the end of a run, evaluation writes every figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8_rgb(img: torch.Tensor, rgb: Sequence[int] | None) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 with a 2-98 % stretch per channel."""
    idx = list(rgb) if rgb is not None else ([0, 1, 2] if img.shape[0] >= 3 else [0, 0, 0])
    x = img[idx].float().numpy()
    out = np.empty(x.shape[1:] + (3,), dtype=np.uint8)
    for c in range(3):
        lo, hi = np.percentile(x[c], [2, 98])
        out[..., c] = np.clip((x[c] - lo) / max(hi - lo, 1e-8) * 255, 0, 255).astype(np.uint8)
    return out


@torch.no_grad()
def pca_components(patch_tokens: torch.Tensor, n: int = 3) -> torch.Tensor:
    """(N, D) tokens -> (N, n) projections on the top principal components, scaled to [0, 1]."""
    x = patch_tokens.float()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:n].T
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    return ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


@torch.no_grad()
def pca_feature_png(backbone: torch.nn.Module, image: torch.Tensor, out: str | Path,
                    rgb: Sequence[int] | None = None, upscale: int = 4) -> Path:
    """Save [input RGB | PCA of patch features] as a PNG. `image` is (C, H, W) in [0, 1] in the backbone's band
    order; it is normalised with the backbone's contract."""

    patch = backbone.token_stride
    c, h, w = image.shape
    h, w = h - h % patch, w - w % patch
    image = image[:, :h, :w]
    x = backbone.geodino_contract.normalize(image.float()).unsqueeze(0)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats = backbone.forward_features(x.to(device))["x_norm_patchtokens"][0].cpu()
    backbone.train(was_training)
    gh, gw = h // patch, w // patch
    comps = pca_components(feats).reshape(gh, gw, 3).numpy()
    pca = Image.fromarray((comps * 255).astype(np.uint8)).resize((w * upscale // 2, h * upscale // 2), Image.NEAREST)
    rgb_img = Image.fromarray(to_uint8_rgb(image, rgb)).resize(pca.size, Image.BILINEAR)
    canvas = Image.new("RGB", (pca.width * 2 + 8, pca.height), (255, 255, 255))
    canvas.paste(rgb_img, (0, 0))
    canvas.paste(pca, (pca.width + 8, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


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
    rgb = to_uint8_rgb(image01.float(), None)
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
    rgb = to_uint8_rgb(image01.float(), None)
    return _row([rgb, tv, _ramp(p / top)], out, _scale_for(t.shape[0]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def confusion_png(confusion: Sequence[Sequence[float]], class_names: Sequence[str], out: str | Path,
                  title: str = "", skip: Sequence[int] = ()) -> Path:
    """Row-normalised confusion matrix (rows: truth, columns: prediction) with counts-derived percentages;
    classes in `skip` (an ignored label) are left out. matplotlib, since the table needs text and a colour bar."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    keep = [i for i in range(cm.shape[0]) if i not in set(skip)]
    cm = cm[np.ix_(keep, keep)]
    names = [str(class_names[i]) if i < len(class_names) else str(i) for i in keep]
    rows = cm.sum(1, keepdims=True)
    pct = np.divide(100.0 * cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(keep)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k), dpi=100)
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if pct[i, j] > 60 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="% of true class")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(plt, fig, out)


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def lr_sweep_png(curve: dict, out: str | Path, best: float | None = None, metric: str = "score",
                 title: str = "") -> Path:
    """Validation score against learning rate (log axis), the chosen one marked."""
    plt = _pyplot()
    pts = sorted((float(k), float(v)) for k, v in curve.items())
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.plot(xs, ys, "o-", color="#1f77b4")
    if best is not None:
        by = dict(pts).get(float(best))
        if by is not None:
            ax.plot([best], [by], "*", markersize=14, color="#d62728", label=f"chosen {best:g}")
            ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {metric}")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)
