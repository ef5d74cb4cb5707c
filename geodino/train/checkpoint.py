"""Resumable training checkpoints: written atomically, the last `keep_last` kept.

A checkpoint is one `torch.save` file `checkpoints/step_<N>.pt` holding the full training state:
models (student, EMA teacher, heads, Gram teacher), optimiser, loss centres, RNG states (python,
numpy, torch, CUDA), the data position and the config; plus the backbone *contract* (architecture
kwargs, bands, normalisation, patch size) so the backbone can be used without the training code.
The file is written to a temporary name and renamed, so a run killed mid-write never leaves a
truncated checkpoint behind (`os.replace` is atomic on POSIX).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geodino.errors import CheckpointError

_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def save_atomic(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _STEP_RE.search(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(state: dict, folder: str | Path, step: int, keep_last: int = 3) -> Path:
    path = save_atomic(state, Path(folder) / f"step_{step:08d}.pt")
    if keep_last and keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """Load a geodino training checkpoint (a run directory resolves to its latest checkpoint)."""
    path = resolve_checkpoint(path)
    try:
        # Our own checkpoints hold python objects (config, RNG states): trusted files only.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder, or a file -> the checkpoint file."""
    p = Path(path)
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            latest = latest_checkpoint(folder)
            if latest is not None:
                return latest
        raise CheckpointError(f"no checkpoint (step_*.pt) found in run directory {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p
