"""The Hydra configs: where they live and what the model configs name.

``configs/`` ships inside the wheel as ``geodino.configs``, so this works for regular and editable installs.
Folders named in ``$GEODINO_CONFIG_PATH`` (separated like ``PATH``) are searched too, before the packaged ones,
with the same layout (``stage/``, ``data/``, ``model/``, ``task/``): a new stage, data source or model is one
YAML file there, e.g. ``$GEODINO_CONFIG_PATH/stage/mystage.yaml`` for ``geodino train stage=mystage``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml  # PyYAML arrives with hydra-core / omegaconf


def configs_dir() -> Path:
    """The folder holding the packaged Hydra configs."""
    return Path(str(resources.files("geodino.configs")))


def model_configs() -> dict[str, dict]:
    """configs/model/<stem>.yaml -> {"name": registry name, "kwargs": {...}}."""

    out = {}
    for p in sorted(group_files("model").values()):
        doc = yaml.safe_load(p.read_text()) or {}
        if doc.get("name"):
            out[p.stem] = {"name": str(doc["name"]), "kwargs": dict(doc.get("kwargs") or {})}
    return out


def user_config_dirs() -> list[Path]:
    """The folders of ``$GEODINO_CONFIG_PATH`` (searched before the packaged configs)."""
    raw = os.environ.get("GEODINO_CONFIG_PATH", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def config_dirs() -> list[Path]:
    """Every config folder, highest priority first: the user folders, then the packaged configs."""
    return [*user_config_dirs(), configs_dir()]


def group_files(group: str) -> dict[str, Path]:
    """{option: YAML file} of a config group across every config folder (a user file shadows a packaged one)."""
    out: dict[str, Path] = {}
    for root in reversed(config_dirs()):
        for p in sorted((root / group).glob("*.yaml")):
            out[p.stem] = p
    return out
