"""Reports: JSON with every number and the config, and a Markdown table (figures: geodino.figures)."""

from __future__ import annotations

import json
from pathlib import Path

from geodino.outputs import atomic_write_text


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
