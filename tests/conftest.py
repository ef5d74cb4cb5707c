"""Shared test fixtures: the DINOv3 reference tensors (see geodino.testing for the helpers)."""

from __future__ import annotations

import pytest
import torch

from geodino.testing import reference_dir


@pytest.fixture(scope="session")
def ref_dir():
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


@pytest.fixture(autouse=True)
def _geodino_log_reaches_caplog():
    """A CLI run's setup_logging stops the geodino logger from propagating (no duplicate lines under a user's root
    handlers) and attaches a stream handler bound to the (captured) stderr of the test that ran it; after each
    test, remove the handlers it added and let the logger propagate again, so that every test's caplog sees
    geodino's records whatever ran before."""
    import logging

    logger = logging.getLogger("geodino")
    before = list(logger.handlers)
    yield
    for handler in list(logger.handlers):
        if handler not in before:
            logger.removeHandler(handler)
    logger.propagate = True
