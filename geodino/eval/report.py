"""Reports: JSON with every number and the config, a Markdown table, per-class IoU and learning-rate-sweep tables,
and confusion-matrix / LR-sweep PNGs beside them (drawn by geodino.figures)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from geodino.outputs import atomic_write_text

log = logging.getLogger("geodino")


def write_report(out_dir: str | Path, results: dict, config: dict | None = None, title: str = "geodino report",
                 json_only: dict | None = None, appendix: str = "") -> tuple[Path, Path]:
    """results.json (every number, `json_only` entries, the config) and report.md (a table of the scalar numbers
    of `results`, then `appendix`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    atomic_write_text(js, json.dumps({"results": {**results, **(json_only or {})}, "config": config}, indent=2,
                                     default=str))
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in _flatten(results).items():
        if isinstance(v, (int, float)):
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    md = out_dir / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n" + appendix)
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


# ----------------------------------------------------------------------------------------------
# Per-class tables, confusion matrices, LR-sweep curves
# ----------------------------------------------------------------------------------------------

def walk(d: dict, path: str = "") -> list[tuple[str, dict]]:
    """Every nested dict of `d` with its dotted path (depth first, in insertion order)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            p = f"{path}.{k}" if path else str(k)
            out.append((p, v))
            out.extend(walk(v, p))
    return out


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.replace(".heads.", ".").replace("heads.", ""))[:80]


def eval_figures(results: dict, figures_dir: str | Path) -> dict[str, str]:
    """``confusion_<head>.png`` for every scored segmentation head and ``lr_sweep_<head>.png`` for every sweep;
    returns {path in results: figure file name}. A figure never fails a finished evaluation."""
    from geodino.figures import confusion_png, lr_sweep_png

    figures_dir = Path(figures_dir)
    made: dict[str, str] = {}
    for path, node in walk(results):
        try:
            if "confusion" in node and node.get("confusion_classes"):
                ign = node.get("ignore_index")
                f = confusion_png(node["confusion"], node["confusion_classes"],
                                  figures_dir / f"confusion_{_slug(path)}.png", title=path,
                                  skip=[] if ign is None else [int(ign)])
                made[f"{path}.confusion"] = f.name
            sweep = node.get("lr_sweep")
            if isinstance(sweep, dict) and sweep.get("val"):
                f = lr_sweep_png(sweep["val"], figures_dir / f"lr_sweep_{_slug(path)}.png", sweep.get("best_lr"),
                                 str(sweep.get("metric", "score")), title=f"{path} (on {sweep.get('selected_on')})")
                made[f"{path}.lr_sweep"] = f.name
        except Exception as e:  # pragma: no cover - figures are best effort
            log.warning("no figure for %s: %s", path, e)
    return made


def eval_markdown(results: dict, figures: dict[str, str] | None = None) -> str:
    """Per-class IoU tables (with the confusion figure) and LR-sweep tables (with the curve) for report.md."""
    figures = figures or {}
    lines: list[str] = []
    for path, node in walk(results):
        pc = node.get("per_class_iou")
        if isinstance(pc, dict) and pc:
            lines += ["", f"### Per-class IoU — {path}", "", "| class | IoU |", "|---|---|"]
            lines += [f"| {c} | {'—' if v is None else f'{v:.2f}'} |" for c, v in pc.items()]
            if "miou" in node:
                lines.append(f"| **mean** | **{node['miou']:.2f}** |")
            if f"{path}.confusion" in figures:
                lines += ["", f"![confusion {path}](figures/{figures[f'{path}.confusion']})"]
        sweep = node.get("lr_sweep")
        if isinstance(sweep, dict) and sweep.get("val"):
            lines += ["", f"### Learning-rate sweep — {path} (scored on {sweep.get('selected_on')}"
                      + (f", refit on {sweep['refit_on']}" if sweep.get("refit_on") else "") + ")", "",
                      f"| lr | validation {sweep.get('metric', 'score')} |", "|---|---|"]
            for lr, v in sweep["val"].items():
                mark = " ← chosen" if float(lr) == float(sweep.get("best_lr")) else ""
                lines.append(f"| {lr} | {v:.4f}{mark} |")
            if f"{path}.lr_sweep" in figures:
                lines += ["", f"![lr sweep {path}](figures/{figures[f'{path}.lr_sweep']})"]
    return "\n".join(lines) + ("\n" if lines else "")
