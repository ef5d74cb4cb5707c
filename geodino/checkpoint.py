"""The geodino checkpoint format: its one owner (writing, finding, reading, and a typed view).

Three kinds of file, all one ``torch.save`` dict with a ``format`` entry:

- a **training checkpoint** ``<run_dir>/checkpoints/step_<N>.pt`` (``format: geodino-train-checkpoint``): the full
  training state (``models.meta_arch``: the meta-architecture's state dict, with the student under ``student.*``
  and the EMA teacher under ``teacher.*``; ``optimizer``; ``rng``; ``data_position``; ``nan_streak``) plus what a
  user needs without the training code (``contract``, ``stage``, ``step``, ``config``, ``data``) and stage extras
  (``init``, ``teacher``, ``students``, ``dinotxt``…);
- a **backbone file** (``format: geodino-backbone``): ``backbone`` (official keys) and its ``contract``, e.g. a
  distilled student;
- a **dino.txt model** (``format: geodino-dinotxt-model``): a text model outside a run, same layout as a text-stage
  training checkpoint without the optimiser.

Files are written to a temporary name, fsynced and renamed (`save_atomic`), so a run killed mid-write never leaves
a truncated checkpoint; the last ``keep_last`` training checkpoints are kept. `Checkpoint.open(path)` reads any of
them (a run directory resolves to its latest checkpoint) and answers the questions every caller asks — which
stage, which step, which contract, which backbone weights — so no other module parses the layout.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from geodino.contract import Contract
from geodino.errors import CheckpointError

TRAIN_FORMAT = "geodino-train-checkpoint"
BACKBONE_FORMAT = "geodino-backbone"
DINOTXT_FORMAT = "geodino-dinotxt-model"
DINOTXT_KIND = "geodino-dinotxt"

_STEP_RE = re.compile(r"step_(\d+)\.pt$")


# ------------------------------------------------------------------------------------------------
# Writing and finding files
# ------------------------------------------------------------------------------------------------

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


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder, or a file -> the checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            latest = latest_checkpoint(folder)
            if latest is not None:
                return latest
        raise CheckpointError(f"no checkpoint (step_*.pt) found in run directory {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_payload(step: int, model_state: dict, optimizer_state: dict, data_position: int, nan_streak: int,
                     extra: dict | None = None) -> dict:
    """The dict a training checkpoint holds (see the module docstring)."""
    return {
        "format": TRAIN_FORMAT,
        "step": int(step),
        "models": {"meta_arch": model_state},
        "optimizer": optimizer_state,
        "rng": rng_state(),
        "data_position": int(data_position),
        "nan_streak": int(nan_streak),
        **(extra or {}),
    }


def backbone_payload(backbone_state: dict, contract: Contract, **extra) -> dict:
    """A standalone backbone file (official keys + contract)."""
    return {"format": BACKBONE_FORMAT, "backbone": backbone_state, "contract": contract.to_dict(), **extra}


def load_checkpoint(path: str | Path) -> dict:
    """The raw dict of a geodino checkpoint file (a run directory resolves to its latest checkpoint)."""
    path = resolve_checkpoint(path)
    try:
        # Our own checkpoints hold python objects (config, RNG states): trusted files only.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------
# Reading: a typed view
# ------------------------------------------------------------------------------------------------

class Checkpoint:
    """A read view of a geodino checkpoint file (any of the three kinds)."""

    def __init__(self, raw: dict, path: Path | None = None):
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: not a geodino checkpoint (holds a {type(raw).__name__})")
        self.raw = raw
        self.path = path

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        file = resolve_checkpoint(path)
        return cls(load_checkpoint(file), file)

    # -- identity ----------------------------------------------------------------------------------
    @property
    def format(self) -> str | None:
        return self.raw.get("format")

    @property
    def is_training(self) -> bool:
        return self.format == TRAIN_FORMAT and isinstance(self.raw.get("models"), dict)

    @property
    def is_backbone_file(self) -> bool:
        return "backbone" in self.raw and "contract" in self.raw

    @property
    def is_dinotxt(self) -> bool:
        return self.raw.get("kind") == DINOTXT_KIND and "dinotxt" in self.raw

    @property
    def stage(self) -> str | None:
        return self.raw.get("stage")

    @property
    def step(self) -> int | None:
        s = self.raw.get("step")
        return None if s is None else int(s)

    @property
    def config(self) -> dict:
        return self.raw.get("config") or {}

    @property
    def data(self) -> dict:
        return self.raw.get("data") or {}

    @property
    def has_contract(self) -> bool:
        return "contract" in self.raw

    @property
    def contract(self) -> Contract:
        if "contract" not in self.raw:
            raise CheckpointError(f"{self.path} has no contract (bands, normalisation): not a geodino checkpoint")
        return Contract.from_dict(self.raw["contract"], where=str(self.path))

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    # -- weights -----------------------------------------------------------------------------------
    @property
    def meta_arch_state(self) -> dict:
        models = self.raw.get("models")
        if not isinstance(models, dict) or "meta_arch" not in models:
            raise CheckpointError(f"{self.path} holds no model state ('models.meta_arch')")
        return models["meta_arch"]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The part of the meta-architecture state under `prefix` (e.g. ``teacher.dino_head.``), prefix removed."""
        return {k[len(prefix):]: v for k, v in self.meta_arch_state.items() if k.startswith(prefix)}

    def has_state(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.meta_arch_state)

    def backbone_state(self, which: str = "teacher") -> dict[str, torch.Tensor]:
        """Official-key backbone weights: the EMA ``teacher`` (default) or the ``student`` of a training
        checkpoint, or the backbone of a backbone file / dino.txt model."""
        if self.is_backbone_file:
            return dict(self.raw["backbone"])
        if self.is_dinotxt and not self.has_state(f"{which}.backbone."):
            sd = self.state(self.raw["dinotxt"].get("state_prefix", "model.") + "visual_model.backbone.")
            if sd:
                return sd
        if which not in ("teacher", "student"):
            raise CheckpointError(f"which must be teacher or student, got '{which}'")
        sd = self.state(f"{which}.backbone.")
        if not sd:
            raise CheckpointError(f"checkpoint {self.path} has no '{which}' backbone")
        return sd

    # -- checks ------------------------------------------------------------------------------------
    def require_training(self, what: str) -> "Checkpoint":
        if not self.is_training or not self.has_contract:
            raise CheckpointError(f"{what}={self.path} is not a geodino training checkpoint")
        return self

    def require_stage(self, stages: Sequence[str], what: str) -> "Checkpoint":
        """A training checkpoint of one of `stages`, or an error naming the stage found."""
        self.require_training(what)
        if self.stage not in stages:
            raise CheckpointError(f"{what}={self.path} is a '{self.stage}' run; this needs a "
                                  f"{' or '.join(stages)} run")
        return self

    def require_states(self, prefixes: Iterable[str], what: str) -> "Checkpoint":
        for prefix in prefixes:
            if not self.has_state(prefix):
                raise CheckpointError(f"{what}={self.path} has no {prefix.rstrip('.')} weights (keys {prefix}*)")
        return self
