"""Helpers for tests that compare geodino against the official DINOv3 reference tensors.

`reference_dir()` is `$GEODINO_REFERENCE_DIR`, defaulting to `../shared/fixtures/dinov3_reference`
next to the repository. Kept in the package (not a conftest) so every test folder imports the same
module regardless of pytest's rootdir handling.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_DEFAULT_REF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3_reference"


def reference_dir() -> Path:
    return Path(os.environ.get("GEODINO_REFERENCE_DIR", _DEFAULT_REF))


def fp32_state_dict(sd: dict) -> dict:
    """Reference weights are stored as fp16 (exactly representable); cast floats to fp32."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Relative error ||a - e|| / ||e|| <= rtol (the project's 1e-5 fp32 exactness bar)."""
    actual = actual.detach().float()
    expected = expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err.item():.3e} > {rtol:g}"


def cli_error_lines(stderr: str) -> list[str]:
    """The lines of a CLI run's stderr that are not geodino's timestamped log lines (progress logs may
    precede a failure; the failure itself must be one `error: ...` line)."""
    import re

    log_line = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")
    return [line for line in stderr.strip().splitlines() if line.strip() and not log_line.match(line)]
