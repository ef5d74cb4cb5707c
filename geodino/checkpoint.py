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

A backbone file or a dino.txt model may also be a **safetensors file** (`save_safetensors`, ``geodino export
format=safetensors``): its tensors are the weights (``backbone`` / ``models.meta_arch``) under their own keys, and
its metadata holds ``format``, ``geodino_contract`` (the contract, JSON) and ``geodino_checkpoint`` (every other
entry — data scaling, dino.txt config, tokenizer, provenance — JSON). `load_checkpoint` reads one back into the
same dict, so every reader works on either; reading a safetensors file can run no code at all.

Files are written to a temporary name, fsynced and renamed (`save_atomic`), so a run killed mid-write never leaves
a truncated checkpoint; the last ``keep_last`` training checkpoints are kept. `Checkpoint.open(path)` reads any of
them (a run directory resolves to its latest checkpoint) and answers the questions every caller asks — which
stage, which step, which contract, which backbone weights — so no other module parses the layout.

Loading never executes code: every file holds only tensors, numbers, strings, lists, tuples and dicts (configs as
plain containers, RNG states as tensors and numbers; `save_atomic` refuses anything else), and is read with
``torch.load(weights_only=True)``. A file that needs more — a pickle from an older geodino, or one that was tampered
with — is refused with a message; a trusted one converts once with
``python -m geodino.checkpoint convert OLD NEW --trust``.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from geodino.contract import Contract
from geodino.errors import CheckpointError
from geodino.outputs import atomic_output

TRAIN_FORMAT = "geodino-train-checkpoint"
BACKBONE_FORMAT = "geodino-backbone"
DINOTXT_FORMAT = "geodino-dinotxt-model"
DINOTXT_KIND = "geodino-dinotxt"

_STEP_RE = re.compile(r"step_(\d+)\.pt$")


# ------------------------------------------------------------------------------------------------
# Writing and finding files
# ------------------------------------------------------------------------------------------------

def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as the types ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, bytes, None, and
    lists / tuples / dicts of those. numpy arrays and scalars, paths, OmegaConf containers and contracts are
    converted; anything else is an error naming where it is (so no file is written that cannot be read safely)."""
    if isinstance(obj, np.generic):  # before the Python types: np.float64 is a float subclass
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy()) if obj.dtype != np.uint32 else torch.from_numpy(obj.astype(np.int64))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Contract):
        return obj.to_dict()
    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, which a safe (weights-only) checkpoint cannot store")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write `obj` (made `plain`) to `path` through a temporary file, fsync and rename (geodino.outputs): a failed
    write (disk full, killed) leaves the previous file intact and no partial file; a full disk is one line."""
    path = Path(path)
    obj = plain(obj, path.name)
    previous = path.stat().st_size if path.exists() else None
    with atomic_output(path, needs_bytes=previous) as tmp:
        torch.save(obj, tmp)
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
    """Every RNG's state as tensors and numbers (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
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


# where each kind of file that may be a safetensors file keeps its weights
_SAFETENSORS_WEIGHTS = {BACKBONE_FORMAT: ("backbone",), DINOTXT_FORMAT: ("models", "meta_arch")}


def save_safetensors(payload: dict, path: str | Path) -> Path:
    """Write a backbone file or dino.txt model `payload` (the dict `save_atomic` would write) as a safetensors file:
    the weights as its tensors, the contract and every other entry as JSON in its metadata (see the module doc),
    atomically. A training checkpoint (optimiser, RNG state) has no safetensors form: export its model instead."""
    path = Path(path)
    fmt = payload.get("format")
    if fmt not in _SAFETENSORS_WEIGHTS:
        raise CheckpointError(f"{path.name}: only a backbone file or a dino.txt model is written as safetensors, "
                              f"not a {fmt or 'format-less'} dict (export the model of a training checkpoint)")
    if "contract" not in payload:
        raise CheckpointError(f"{path.name}: a geodino safetensors file needs the model's contract")
    first, *rest = _SAFETENSORS_WEIGHTS[fmt]
    weights = payload[first]
    for key in rest:
        weights = weights[key]
    # clone: safetensors refuses tensors that share memory (tied weights), and the file has no notion of sharing
    tensors = {str(k): v.detach().cpu().clone().contiguous() for k, v in weights.items()}
    others = plain({k: v for k, v in payload.items() if k not in ("format", "contract", first)}, path.name)
    beside = {k: v for k, v in payload[first].items() if k != rest[0]} if rest else {}
    if beside:  # other entries beside the weights in the same nested dict (none today; kept if any appear)
        others[first] = plain(beside, f"{path.name}.{first}")

    def no_tensor(obj, where):
        if torch.is_tensor(obj):
            raise CheckpointError(f"{where} is a tensor outside the weights: a safetensors file keeps those as JSON")
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()):
            no_tensor(v, f"{where}.{k}")

    no_tensor(others, path.name)
    from safetensors.torch import save_file

    meta = {"format": fmt, "geodino_contract": json.dumps(plain(payload["contract"])),
            "geodino_checkpoint": json.dumps(others)}
    previous = path.stat().st_size if path.exists() else None
    need = sum(v.numel() * v.element_size() for v in tensors.values())
    with atomic_output(path, needs_bytes=max(need, previous or 0)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def safetensors_format(path: str | Path) -> str | None:
    """The geodino ``format`` a safetensors file's metadata states (None: not one `save_safetensors` wrote)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    return fmt if fmt in _SAFETENSORS_WEIGHTS else None


def read_safetensors_file(path: str | Path) -> tuple[dict, dict]:
    """(tensors, string metadata) of a safetensors file; any failure is one CheckpointError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def read_safetensors(path: str | Path) -> dict:
    """The dict `save_safetensors` was given, from its file (tensors by safetensors, the rest from JSON: no code runs).
    A safetensors file with a geodino contract but no geodino format (a backbone exported before the format was
    recorded) reads as a backbone file."""
    path = Path(path)
    tensors, meta = read_safetensors_file(path)
    fmt = meta.get("format")
    if fmt not in _SAFETENSORS_WEIGHTS:
        if "geodino_contract" not in meta:
            raise CheckpointError(f"{path} is a safetensors file without a geodino contract (metadata "
                                  f"{sorted(meta) or 'empty'}): load its weights with load_backbone('{path}')")
        fmt = BACKBONE_FORMAT
    try:
        payload = json.loads(meta.get("geodino_checkpoint") or "{}")
        contract = json.loads(meta["geodino_contract"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: its geodino metadata is not valid JSON ({e})") from e
    first, *rest = _SAFETENSORS_WEIGHTS[fmt]
    if rest:
        payload[first] = {**payload.get(first, {}), rest[0]: tensors}
    else:
        payload[first] = tensors
    return {"format": fmt, **payload, "contract": contract}


def load_checkpoint(path: str | Path) -> dict:
    """The raw dict of a geodino checkpoint file (a run directory resolves to its latest checkpoint), read with
    ``torch.load(weights_only=True)``, or of a geodino safetensors file (`read_safetensors`): loading never runs
    code from the file."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower() and "weights only" not in str(e).lower():
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and plain values (a checkpoint from an older geodino, or a "
            "modified file) and is refused: loading it could run code. If you trust where it came from, convert it "
            f"once with: python -m geodino.checkpoint convert {path} <new file> --trust"
        ) from None
    except Exception as e:  # corrupt / truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def convert_legacy(path: str | Path, out: str | Path) -> Path:
    """Rewrite a TRUSTED pickle-era checkpoint in the safe format (this one call unpickles it in full)."""
    src, out = Path(path), Path(out)
    if src.resolve() == out.resolve():
        raise CheckpointError(f"convert writes a new file; {out} is the input")
    obj = torch.load(src, map_location="cpu", weights_only=False)  # noqa: S614 -- the user vouched for this file
    if isinstance(obj, dict) and isinstance(obj.get("rng", {}).get("numpy"), tuple):
        kind, keys, pos, has_gauss, cached = obj["rng"]["numpy"]
        obj["rng"]["numpy"] = (kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss),
                               float(cached))
    return save_atomic(obj, out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m geodino.checkpoint convert OLD NEW --trust``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m geodino.checkpoint", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="rewrite a trusted checkpoint of an older geodino in the safe format")
    conv.add_argument("old")
    conv.add_argument("new")
    conv.add_argument("--trust", action="store_true", help="I trust this file: it may run code when unpickled")
    args = ap.parse_args(argv)
    if not args.trust:
        print("error: converting unpickles the whole file, which can run code it contains; pass --trust if you "
              "trust where it came from", file=sys.stderr)
        return 2
    try:
        out = convert_legacy(args.old, args.new)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Checkpoint.open(out)  # proves the result loads safely
    print(f"wrote {out}")
    return 0


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
