"""Packaging guard: every geodino sub-package is listed in pyproject (the list is explicit because
the top-level configs/ folder ships as geodino.configs)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "geodino").rglob("__init__.py")}
    missing = found - listed
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert "geodino.configs" in listed


def test_configs_are_package_data():
    import geodino.configs  # noqa: F401 — importable as a package
    from geodino.cli import configs_dir

    assert (configs_dir() / "train.yaml").is_file()
    assert (configs_dir() / "stage" / "pretrain.yaml").is_file()
