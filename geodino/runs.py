"""Run directories: one folder per run with the config snapshot, metrics as JSONL and checkpoints.

Layout (the same for train, eval and segment)::
    <run_dir>/config.yaml        the composed config, as run
    <run_dir>/metrics.jsonl      one JSON object per logged step
    <run_dir>/checkpoints/       training checkpoints (see geodino.train.checkpoint)
    <run_dir>/run.log            human-readable log
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

log = logging.getLogger("geodino")


def default_run_dir(verb: str, name: str, base: str | Path = "outputs") -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(base) / verb / name / stamp


def prepare_run_dir(run_dir: str | Path, cfg=None) -> Path:
    """Create the run directory, write the config snapshot and attach a file log handler."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    setup_logging(run_dir / "run.log")
    return run_dir


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (pytest and notebooks swap it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def setup_logging(path: Path | None = None, level: int = logging.INFO) -> None:
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        sh = _StderrHandler()
        sh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(sh)
    if path is not None:
        path = Path(path)
        for h in list(log.handlers):
            if isinstance(h, logging.FileHandler):
                log.removeHandler(h)
                h.close()
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    log.propagate = False


def json_safe(v: Any) -> Any:
    """Plain JSON values: tensors -> floats / lists, NaN and inf -> None (shown as missing, never as a number),
    dict keys -> strings. Metrics, summaries and reports all go through this."""
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


class MetricsWriter:
    """Append-only JSONL metrics; safe to reopen after a resume (rows past `truncate_after` are dropped)."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run replays the steps after its checkpoint: drop their stale rows so the
            # file holds each step once.
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", -1) <= truncate_after_step:
                    keep.append(line)
            self.path.write_text("".join(k + "\n" for k in keep))
        self._f = open(self.path, "a", buffering=1)

    def write(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **json_safe(row)}
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
