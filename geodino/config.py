"""The packaged Hydra configs: where they live and what the model configs name.

``configs/`` ships inside the wheel as ``geodino.configs``, so this works for regular and editable installs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def configs_dir() -> Path:
    """The folder holding the packaged Hydra configs."""
    return Path(str(resources.files("geodino.configs")))


def model_configs() -> dict[str, dict]:
    """configs/model/<stem>.yaml -> {"name": registry name, "kwargs": {...}}."""
    import yaml  # PyYAML arrives with hydra-core / omegaconf

    out = {}
    for p in sorted((configs_dir() / "model").glob("*.yaml")):
        doc = yaml.safe_load(p.read_text()) or {}
        if doc.get("name"):
            out[p.stem] = {"name": str(doc["name"]), "kwargs": dict(doc.get("kwargs") or {})}
    return out
