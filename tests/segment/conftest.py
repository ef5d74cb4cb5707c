"""Small random dino.txt checkpoints for the segmentation tests (fast to build, any band count)."""

from __future__ import annotations

import pytest
import torch


def make_micro(path, bands=("R", "G", "B", "NIR"), patch_size=16, seed=0, scale=None):
    from geodino.models import build_backbone
    from geodino.text.dinotxt import DinoTxt, DinoTxtConfig
    from geodino.text.io import save_dinotxt

    torch.manual_seed(seed)
    bb = build_backbone("geodino_vit_tiny", in_chans=len(bands), embed_dim=32, num_heads=1, depth=1,
                        patch_size=patch_size)
    bb.geodino_contract = bb.geodino_contract.with_data(bands=list(bands), mean=[0.4] * len(bands), std=[0.2] * len(bands))
    model = DinoTxt(bb, DinoTxtConfig(embed_dim=32, head_blocks=1, text_width=32, text_layers=1, text_heads=1))
    return save_dinotxt(model, path, data={"scale": scale})


@pytest.fixture(scope="session")
def micro4(tmp_path_factory):
    return make_micro(tmp_path_factory.mktemp("micro4") / "micro4.pt")


@pytest.fixture(scope="session")
def micro3(tmp_path_factory):
    return make_micro(tmp_path_factory.mktemp("micro3") / "micro3.pt", bands=("R", "G", "B"), seed=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Micro models on a shared CPU: one thread avoids OpenMP barrier stalls (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
