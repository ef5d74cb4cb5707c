"""`geodino export checkpoint=<run or file> format=official|safetensors [which=teacher|student] [out=...]`."""

from __future__ import annotations

from pathlib import Path

from geodino.models import export_backbone, load_backbone


def run_export(cfg) -> Path:
    src = Path(str(cfg.checkpoint))
    model = load_backbone(src, which=str(cfg.which))
    fmt = str(cfg.format)
    suffix = ".pth" if fmt == "official" else ".safetensors"
    out = Path(cfg.out) if cfg.out else (src if src.is_dir() else src.parent) / f"backbone_{cfg.which}{suffix}"
    export_backbone(model, out, fmt)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"wrote {out} ({fmt}, {len(model.state_dict())} keys, {n / 1e6:.2f}M values)")
    return out
