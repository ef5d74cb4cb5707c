"""Shared test fixtures: the DINOv3 reference tensors and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_DEFAULT_REF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3_reference"


def reference_dir() -> Path:
    return Path(os.environ.get("GEODINO_REFERENCE_DIR", _DEFAULT_REF))


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.skip(
            f"DINOv3 reference tensors not found at {path}; set GEODINO_REFERENCE_DIR to the folder "
            "holding vit_small_depth2.pt etc. (CI always has it)"
        )
    return path


@pytest.fixture(scope="session")
def load_ref(ref_dir):
    """Load a reference file by stem, e.g. load_ref('loss_dino')."""

    def _load(name: str):
        path = ref_dir / f"{name}.pt"
        if not path.is_file():
            pytest.skip(f"reference file {path} is missing")
        return torch.load(path, map_location="cpu", weights_only=False)

    return _load


def fp32_state_dict(sd: dict) -> dict:
    """Reference weights are stored as fp16 (exactly representable); cast floats to fp32."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = ""):
    """Relative error ||a-e|| / ||e|| <= rtol (the project's 1e-5 fp32 exactness bar)."""
    actual = actual.detach().float()
    expected = expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err.item():.3e} > {rtol:g}"
