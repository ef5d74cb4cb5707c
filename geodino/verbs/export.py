"""`geodino export checkpoint=<run or file> format=official|safetensors [which=teacher|student] [out=...]
[overwrite=true]`.

``out`` never replaces the source checkpoint or a training checkpoint (``step_*.pt`` in a run's ``checkpoints/``),
and replaces another existing file only with ``overwrite=true``; the file is written atomically (geodino.outputs).
"""

from __future__ import annotations

import re
from pathlib import Path

from geodino.checkpoint import latest_checkpoint
from geodino.errors import GeodinoError
from geodino.models import export_backbone, load_backbone
from geodino.outputs import check_outputs

_TRAINING_CHECKPOINT = re.compile(r"step_\d+\.pt$")


def _sources(src: Path) -> list[Path]:
    """The checkpoint file(s) `src` names: the file, or a run directory's latest checkpoint."""
    if not src.is_dir():
        return [src]
    return [src, *(p for p in (latest_checkpoint(src / "checkpoints"), latest_checkpoint(src)) if p is not None)]


def run_export(cfg) -> Path:
    src = Path(str(cfg.checkpoint)).expanduser()
    fmt = str(cfg.format)
    suffix = ".pth" if fmt == "official" else ".safetensors"
    out = Path(str(cfg.out)).expanduser() if cfg.out else (src if src.is_dir() else src.parent) / f"backbone_{cfg.which}{suffix}"
    sources = _sources(src) if src.exists() else []  # else load_backbone says what is wrong with checkpoint=
    check_outputs([out], sources, overwrite=True, what="out")  # never the source, whatever overwrite says
    if _TRAINING_CHECKPOINT.search(out.name) and out.parent.name == "checkpoints":
        raise GeodinoError(f"out={out} is a training checkpoint's name in a run's checkpoints/ folder; "
                           "export the backbone to another file")
    check_outputs([out], overwrite=bool(cfg.get("overwrite", False)), what="out")
    model = load_backbone(src, which=str(cfg.which))
    export_backbone(model, out, fmt)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"wrote {out} ({fmt}, {len(model.state_dict())} keys, {n / 1e6:.2f}M values)")
    return out
