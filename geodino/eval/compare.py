"""``geodino eval compare RUN_A RUN_B [...]``: one table of two (or more) evaluation runs of the same task.

Each run is a folder holding ``results.json`` (or the file itself). Rows are the headline numbers, then every
per-class IoU / per-head score the runs share (a missing value shows as ``—``); columns are the runs, named by
their backbone (and weights file), with ``Δ`` (last − first) when two runs are compared. Runs of different tasks
are refused; differing protocols (heads, layers, windows, epochs, lr) are listed under the table so a difference in
settings is not read as a difference in backbones. ``out=<file.md>`` also writes the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from geodino.errors import GeodinoError
from geodino.eval.report import walk
from geodino.outputs import atomic_write_text


def load_results(path: str | Path) -> dict:
    p = Path(path).expanduser()
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise GeodinoError(f"{p}: no results.json (pass an eval run folder, e.g. outputs/eval/loveda/<time>)")
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise GeodinoError(f"{f}: not readable as JSON ({e})") from None
    if "results" not in doc or "task" not in doc["results"]:
        raise GeodinoError(f"{f}: not a geodino eval results.json (no results.task)")
    return doc["results"]


def _label(r: dict, path: str) -> str:
    b = r.get("backbone", {})
    name = str(b.get("name", "?"))
    w = b.get("weights")
    label = f"{name} ({Path(str(w)).name})" if w else name
    return label + (" [random]" if b.get("random_weights") else "") if label else path


def _rows(r: dict) -> dict[str, float]:
    rows: dict[str, float] = {}
    for k, v in (r.get("headline") or {}).items():
        if isinstance(v, (int, float)):
            rows[str(k)] = float(v)
    for path, node in walk(r):
        for key in ("miou", "mae", "rmse", "block_r2", "score"):
            if isinstance(node.get(key), (int, float)) and (path.startswith("heads.") or ".heads." in path
                                                            or path.startswith("tasks.")):
                rows[f"{path}.{key}"] = float(node[key])
        pc = node.get("per_class_iou")
        if isinstance(pc, dict):
            for c, v in pc.items():
                if isinstance(v, (int, float)):
                    rows[f"{path} IoU {c}"] = float(v)
    return rows


def _protocol(r: dict) -> dict:
    p = dict(r.get("protocol") or {})
    for k in ("finetune", "augment"):
        if k in r:
            p[k] = r[k]
    return p


def compare_runs(paths: Sequence[str | Path]) -> str:
    """The Markdown comparison of `paths` (see module doc)."""
    if len(paths) < 2:
        raise GeodinoError("geodino eval compare needs at least two run folders: geodino eval compare RUN_A RUN_B")
    runs = [load_results(p) for p in paths]
    tasks = {r["task"] for r in runs}
    if len(tasks) > 1:
        raise GeodinoError(f"runs of different tasks ({', '.join(sorted(tasks))}) cannot be compared")
    labels = [_label(r, str(p)) for r, p in zip(runs, paths)]
    rows = [_rows(r) for r in runs]
    keys: list[str] = []
    for rw in rows:
        keys += [k for k in rw if k not in keys]
    two = len(runs) == 2
    head = ["metric", *labels] + (["Δ"] if two else [])
    lines = [f"# geodino eval compare — {runs[0]['task']}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for k in keys:
        vals = [rw.get(k) for rw in rows]
        cells = ["—" if v is None else f"{v:.2f}" for v in vals]
        if two:
            cells.append("—" if None in vals else f"{vals[1] - vals[0]:+.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    protos = [_protocol(r) for r in runs]
    differ = sorted({k for p in protos for k in p if any(q.get(k) != p.get(k) for q in protos)})
    if differ:
        lines += ["", "Protocols differ (numbers may not be comparable):", ""]
        lines += [f"- {k}: " + "; ".join(f"{lab}: {p.get(k)}" for lab, p in zip(labels, protos)) for k in differ]
    return "\n".join(lines) + "\n"


def run_compare(paths: Sequence[str], out: str | None = None) -> str:
    md = compare_runs(paths)
    print(md, end="")
    if out:
        atomic_write_text(Path(out).expanduser(), md)
    return md
