"""Reports: JSON with every number and the config, a Markdown table, and PNG figures.

`pca_feature_png` renders the first three principal components of a backbone's patch features as an
RGB image next to the input — the standard way DINO features are inspected (DINOv2/v3 papers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _to_uint8_rgb(img: torch.Tensor, rgb: Sequence[int] | None) -> np.ndarray:
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
def pca_feature_png(backbone: torch.nn.Module, image: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    out: str | Path, rgb: Sequence[int] | None = None, upscale: int = 4) -> Path:
    """Save [input RGB | PCA of patch features] as a PNG. `image` is (C, H, W) in [0, 1]."""
    from PIL import Image

    patch = int(getattr(backbone, "patch_size", 16))
    c, h, w = image.shape
    h, w = h - h % patch, w - w % patch
    image = image[:, :h, :w]
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    x = ((image - m) / s).unsqueeze(0)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    feats = backbone.forward_features(x.to(device))["x_norm_patchtokens"][0].cpu()
    backbone.train(was_training)
    gh, gw = h // patch, w // patch
    comps = pca_components(feats).reshape(gh, gw, 3).numpy()
    pca = Image.fromarray((comps * 255).astype(np.uint8)).resize((w * upscale // 2, h * upscale // 2), Image.NEAREST)
    rgb_img = Image.fromarray(_to_uint8_rgb(image, rgb)).resize(pca.size, Image.BILINEAR)
    canvas = Image.new("RGB", (pca.width * 2 + 8, pca.height), (255, 255, 255))
    canvas.paste(rgb_img, (0, 0))
    canvas.paste(pca, (pca.width + 8, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def write_report(out_dir: str | Path, results: dict, config: dict | None = None, title: str = "geodino report") -> tuple[Path, Path]:
    """results.json (every number + config) and report.md (a table of the scalar numbers)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    js.write_text(json.dumps({"results": results, "config": config}, indent=2, default=str))
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in _flatten(results).items():
        if isinstance(v, (int, float)):
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
