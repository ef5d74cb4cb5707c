"""`geodino export checkpoint=<run, file or folder> format=official|safetensors|timm|hf|onnx [which=teacher|student]
[part=backbone|students|text|segmenter] [out=...] [overwrite=true]`.

``official`` writes a ``.pth``, ``safetensors`` a ``.safetensors``, ``onnx`` a ``.onnx``; ``timm`` and ``hf`` write a
folder (``config.json`` + ``model.safetensors``) that ``timm.create_model("local-dir:<out>")`` /
``transformers.DINOv3ViTModel.from_pretrained(<out>)`` read. ``checkpoint=`` takes anything `load_backbone` reads by
path (a run, a geodino file, an official / timm / HF weights file or folder).

``part=students`` exports every distilled student of a ``stage=distill`` run (``<run>/students/<name>.pt``) to the
folder ``out`` (default ``<run>/students``) as ``<name>.safetensors`` (or the format asked for), with its contract and
provenance (teacher, step, EMA or raw). ``part=text`` writes a ``stage=text`` run's dino.txt model as safetensors
(``format=safetensors``: weights as tensors, config / tokenizer / data scaling / contract as JSON metadata), which
`geodino.text.io.load_dinotxt`, ``OpenVocabSegmenter.from_checkpoint`` and ``geodino segment`` read without
unpickling; ``part=segmenter`` is the same model: ``format=safetensors`` writes that file, ``format=onnx`` the
segmenter's image side.

``out`` never replaces the source checkpoint or a training checkpoint (``step_*.pt`` in a run's ``checkpoints/``),
and replaces another existing file only with ``overwrite=true``; the file is written atomically (geodino.outputs).
"""

from __future__ import annotations

import re
from pathlib import Path

from geodino.checkpoint import Checkpoint, latest_checkpoint
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


def _check_out(out: Path, fmt: str, sources: list[Path], src: Path, overwrite: bool) -> None:
    """Refuse an `out` that would replace the source, a training checkpoint, or (without overwrite) anything."""
    if fmt in FOLDER_FORMATS:  # a folder: never the source or a folder holding it, and replaced only with overwrite
        if any(s.resolve() == out.resolve() or out.resolve() in s.resolve().parents for s in sources):
            raise GeodinoError(f"out {out} would overwrite the input {src}; choose another output path")
        if out.exists() and not out.is_dir():
            raise GeodinoError(f"out {out} is an existing file; format={fmt} writes a folder")
        if out.exists() and not overwrite:
            raise GeodinoError(f"out {out} exists; overwrite=true replaces it")
        return
    check_outputs([out], sources, overwrite=True, what="out")  # never the source, whatever overwrite says
    if _TRAINING_CHECKPOINT.search(out.name) and out.parent.name == "checkpoints":
        raise GeodinoError(f"out={out} is a training checkpoint's name in a run's checkpoints/ folder; "
                           "export the backbone to another file")
    check_outputs([out], overwrite=overwrite, what="out")


def _student_files(src: Path) -> list[Path]:
    """The standalone students of a distill run (``<run>/students/*.pt``; `src` is the run or its students/)."""
    folder = src / "students" if (src / "students").is_dir() else src
    files = sorted(folder.glob("*.pt")) if src.is_dir() else []
    if not files:
        raise GeodinoError(f"part=students exports a stage=distill run's students; {src} has no students/*.pt "
                           "(pass the run directory)")
    return files


def _export_students(src: Path, fmt: str, out: Path | None, which: str, overwrite: bool) -> Path:
    files = _student_files(src)
    folder = out or files[0].parent
    if folder.exists() and not folder.is_dir():
        raise GeodinoError(f"out {folder} is a file; part=students writes one file per student into a folder")
    suffix = {"official": ".pth", "safetensors": ".safetensors", "onnx": ".onnx"}.get(fmt, f"_{fmt}")
    targets = [folder / f"{f.stem}{suffix}" for f in files]
    for target in targets:  # all checked before anything is written
        _check_out(target, fmt, files, src, overwrite)
    for f, target in zip(files, targets):
        raw = Checkpoint.open(f).raw
        info = {k: v for k, v in raw.items() if k not in ("format", "backbone", "contract")}
        model = load_backbone(f, which=which)
        export_backbone(model, target, fmt, **({"info": info} if fmt == "safetensors" else {}))
        print(f"wrote {target} (student {f.stem}, {fmt})")
    return folder


def _segmenter_onnx(cfg, src: Path, out: Path) -> Path:
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


def _text_safetensors(src: Path, out: Path) -> Path:
    """The dino.txt model of a text run / checkpoint / model file as safetensors (loaded strictly first, so the
    file holds exactly the model's weights; no optimiser)."""
    from geodino.text.io import load_dinotxt, save_dinotxt

    model, meta = load_dinotxt(src)
    save_dinotxt(model, out, data=meta["data"], contract=meta["contract"],
                 random_backbone=meta["random_backbone"], step=meta["step"])
    n = sum(v.numel() for v in model.state_dict().values())
    print(f"wrote {out} (dino.txt model, safetensors, {n / 1e6:.2f}M values)")
    return out


def run_export(cfg) -> Path:
    src = Path(str(cfg.checkpoint)).expanduser()
    fmt = str(cfg.format)
    part = str(cfg.get("part", "backbone"))
    overwrite = bool(cfg.get("overwrite", False))
    out = Path(str(cfg.out)).expanduser() if cfg.out else None
    if part == "students":
        return _export_students(src, fmt, out, str(cfg.which), overwrite)
    if part == "segmenter" and fmt not in ("onnx", "safetensors"):
        raise GeodinoError(f"part=segmenter exports the segmenter's image side as format=onnx or its dino.txt model "
                           f"as format=safetensors, not format={fmt}")
    if part == "text" and fmt != "safetensors":
        raise GeodinoError(f"part=text exports the dino.txt model as format=safetensors, not format={fmt} (a "
                           "backbone format exports its frozen backbone: part=backbone)")
    text_model = part == "text" or (part == "segmenter" and fmt == "safetensors")
    suffix = {"official": ".pth", "safetensors": ".safetensors", "onnx": ".onnx"}.get(fmt, f"_{fmt}")
    stem = "text_model" if text_model else "segmenter_image" if part == "segmenter" else f"backbone_{cfg.which}"
    out = out or (src if src.is_dir() else src.parent) / f"{stem}{suffix}"
    sources = _sources(src) if src.exists() else []  # else the loader says what is wrong with checkpoint=
    _check_out(out, fmt, sources, src, overwrite)
    if text_model:
        return _text_safetensors(src, out)
    if part == "segmenter":
        return _segmenter_onnx(cfg, src, out)
    model = load_backbone(src, which=str(cfg.which))
    export_backbone(model, out, fmt)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"wrote {out} ({fmt}, {len(model.state_dict())} keys, {n / 1e6:.2f}M values)")
    return out
