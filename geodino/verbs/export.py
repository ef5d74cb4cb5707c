"""`geodino export checkpoint=<run, file or folder> format=official|safetensors|timm|hf|onnx [which=teacher|student]
[out=...] [overwrite=true]`.

``official`` writes a ``.pth``, ``safetensors`` a ``.safetensors``, ``onnx`` a ``.onnx``; ``timm`` and ``hf`` write a
folder (``config.json`` + ``model.safetensors``) that ``timm.create_model("local-dir:<out>")`` /
``transformers.DINOv3ViTModel.from_pretrained(<out>)`` read. ``checkpoint=`` takes anything `load_backbone` reads by
path (a run, a geodino file, an official / timm / HF weights file or folder).

``out`` never replaces the source checkpoint or a training checkpoint (``step_*.pt`` in a run's ``checkpoints/``),
and replaces another existing file only with ``overwrite=true``; the file is written atomically (geodino.outputs).
"""

from __future__ import annotations

import re
from pathlib import Path

from geodino.checkpoint import latest_checkpoint
from geodino.errors import GeodinoError
from geodino.models import export_backbone, load_backbone
from geodino.models.weights import FOLDER_FORMATS
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
    part = str(cfg.get("part", "backbone"))
    if part == "segmenter" and fmt != "onnx":
        raise GeodinoError(f"part=segmenter exports the segmenter's image side as format=onnx, not format={fmt}")
    suffix = {"official": ".pth", "safetensors": ".safetensors", "onnx": ".onnx"}.get(fmt, f"_{fmt}")
    stem = "segmenter_image" if part == "segmenter" else f"backbone_{cfg.which}"
    out = Path(str(cfg.out)).expanduser() if cfg.out else (src if src.is_dir() else src.parent) / f"{stem}{suffix}"
    sources = _sources(src) if src.exists() else []  # else load_backbone says what is wrong with checkpoint=
    if fmt in FOLDER_FORMATS:  # a folder: never the source or a folder holding it, and replaced only with overwrite
        if any(s.resolve() == out.resolve() or out.resolve() in s.resolve().parents for s in sources):
            raise GeodinoError(f"out {out} would overwrite the input {src}; choose another output path")
        if out.exists() and not out.is_dir():
            raise GeodinoError(f"out {out} is an existing file; format={fmt} writes a folder")
        if out.exists() and not bool(cfg.get("overwrite", False)):
            raise GeodinoError(f"out {out} exists; overwrite=true replaces it")
    else:
        check_outputs([out], sources, overwrite=True, what="out")  # never the source, whatever overwrite says
        if _TRAINING_CHECKPOINT.search(out.name) and out.parent.name == "checkpoints":
            raise GeodinoError(f"out={out} is a training checkpoint's name in a run's checkpoints/ folder; "
                               "export the backbone to another file")
        check_outputs([out], overwrite=bool(cfg.get("overwrite", False)), what="out")
    if part == "segmenter":
        from omegaconf import OmegaConf

        from geodino.segment.open_vocab import OpenVocabSegmenter

        prompts = cfg.get("prompts") or []
        prompts = [prompts] if isinstance(prompts, str) else list(OmegaConf.to_container(prompts) if
                                                                   OmegaConf.is_config(prompts) else prompts)
        templates = cfg.get("templates", "default")
        if OmegaConf.is_config(templates):
            templates = list(OmegaConf.to_container(templates))
        OpenVocabSegmenter.from_checkpoint(str(src)).export_onnx(out, prompts=prompts or None, templates=templates)
        print(f"wrote {out} (segmenter image side, onnx{f', {len(prompts)} class embeddings' if prompts else ''})")
        return out
    model = load_backbone(src, which=str(cfg.which))
    export_backbone(model, out, fmt)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"wrote {out} ({fmt}, {len(model.state_dict())} keys, {n / 1e6:.2f}M values)")
    return out
