"""Fixtures for the eval tests; the fake-dataset builders live in eval_fakes.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.eval_fakes import make_canopy, make_geobench_task, make_loveda


@pytest.fixture
def loveda_root(tmp_path) -> Path:
    return make_loveda(tmp_path / "LoveDA")


@pytest.fixture
def geobench_root(tmp_path) -> Path:
    root = tmp_path / "geobench"
    make_geobench_task(root, "m-fake-cls", "cls", n_classes=3)
    make_geobench_task(root, "m-fake-multilabel", "multilabel", n_classes=4, seed=1)
    make_geobench_task(root, "m-fake-seg", "seg", n_classes=3, size=32, n=(4, 2, 2), seed=2)
    return root


@pytest.fixture
def canopy_root(tmp_path) -> Path:
    return make_canopy(tmp_path / "canopy")


@pytest.fixture(scope="session")
def official_tiny_weights(tmp_path_factory) -> Path:
    """An official-format (flat state dict) .pth of the tiny ViT, as `torch.save(model.state_dict())` writes."""
    import torch

    from geodino.models import load_backbone

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "geodino_vit_tiny_official.pth"
    torch.save(load_backbone("geodino_vit_tiny").state_dict(), path)
    return path
