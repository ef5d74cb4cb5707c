"""Run directories: one folder per run with the config snapshot, metrics as JSONL and checkpoints.

Layout (the same for train, eval and segment)::
    <run_dir>/config.yaml        the composed config, as run
    <run_dir>/metrics.jsonl      one JSON object per logged step
    <run_dir>/tensorboard/       the same scalars as TensorBoard events (``train.loggers=[jsonl,tensorboard]``)
    <run_dir>/checkpoints/       training checkpoints (see geodino.train.checkpoint)
    <run_dir>/run.log            human-readable log
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from geodino.errors import GeodinoError
from geodino.outputs import atomic_write_text, write_errors

log = logging.getLogger("geodino")


class RunFolderBusy(GeodinoError):
    """Another run holds the run folder (see `RunLock`)."""


def default_run_dir(verb: str, name: str, base: str | Path = "outputs") -> Path:
    """``<base>/<verb>/<name>/<date_time>``: a name for a new run folder (not created; see `claim_run_dir`)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(base) / verb / name / stamp


def claim_run_dir(verb: str, name: str, base: str | Path = "outputs") -> Path:
    """Create a new, unique run folder: `default_run_dir`, with ``-1``, ``-2``... appended when another run took
    that name (two runs started in the same second never share a folder: the creation is atomic)."""
    first = default_run_dir(verb, name, base)
    first.parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        cand = first if i == 0 else first.with_name(f"{first.name}-{i}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot find a free run folder name next to {first}")  # pragma: no cover


def prepare_run_dir(run_dir: str | Path, cfg=None) -> Path:
    """Create the run directory, write the config snapshot (unless one is there: a resumed run keeps the config it
    started with; geodino.train.run records changes in config_history.yaml) and attach a file log handler."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg is not None and not (run_dir / "config.yaml").exists():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    setup_logging(run_dir / "run.log")
    return run_dir


class RunLock:
    """One run per run folder: ``<run_dir>/.lock`` holds the pid, host and start time of the run using it.

    `acquire` creates it atomically (O_EXCL); a lock left by a process that no longer runs on this host is stale and
    replaced (with a warning); a live holder — or a holder on another host, which cannot be checked — is a one-line
    error naming it. `release` removes the lock if it is still ours."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not self._alive(pid):
                    log.warning("removing the stale lock of pid %d (no longer running) on %s", pid, self.run_dir)
                    self.path.unlink(missing_ok=True)
                    continue
                if not holder:  # being written this instant, or unreadable: give the writer a moment
                    time.sleep(0.2)
                    holder = self._holder()
                    if not holder:
                        continue
                raise RunFolderBusy(
                    f"run folder {self.run_dir} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')}: wait for that run to finish or pass another run_dir= (if it is gone, "
                    f"delete {self.path})")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunFolderBusy(f"cannot take the lock {self.path}")

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
        with write_errors(path):
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
        with write_errors(self.path):
            self._f = open(self.path, "a", buffering=1)

    def write(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **json_safe(row)}
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


LOGGERS = ("jsonl", "tensorboard")


class TensorBoardWriter:
    """The numeric values of each metrics row as TensorBoard scalars at its ``step`` (torch's SummaryWriter; the
    optional ``tensorboard`` package). A resumed run purges the events after its checkpoint, as the JSONL does."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise GeodinoError("train.loggers includes tensorboard, which is not installed: pip install tensorboard "
                               "(or leave it out: train.loggers=[jsonl])") from e
        with write_errors(Path(log_dir)):
            self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class MetricsLoggers:
    """Fan-out of each metrics row to the run's loggers (`open_metrics`)."""

    def __init__(self, writers: list):
        self.writers = writers

    def write(self, row: dict) -> None:
        for w in self.writers:
            w.write(row)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def open_metrics(run_dir: str | Path, loggers=("jsonl",), truncate_after_step: int | None = None) -> MetricsLoggers:
    """The metrics writers of a run: ``jsonl`` (``metrics.jsonl``) and / or ``tensorboard`` (``tensorboard/``)."""
    names = list(loggers)
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise GeodinoError(f"unknown metrics logger(s) {', '.join(map(str, bad))}; choose from {', '.join(LOGGERS)}")
    run_dir = Path(run_dir)
    writers = []
    if "jsonl" in names:
        writers.append(MetricsWriter(run_dir / "metrics.jsonl", truncate_after_step=truncate_after_step))
    if "tensorboard" in names:
        writers.append(TensorBoardWriter(run_dir / "tensorboard",
                                         None if truncate_after_step is None else truncate_after_step + 1))
    return MetricsLoggers(writers)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
