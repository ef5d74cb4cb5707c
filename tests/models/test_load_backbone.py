"""load_backbone's quiet surprises (issue #14 item 10): a registry name without weights warns that the backbone is
random; an official-layout file (no contract) loads by its path alone, its architecture read off the keys."""

from __future__ import annotations

import logging

import pytest
import torch

from geodino.errors import CheckpointError
from geodino.models import build_backbone, export_backbone, load_backbone
from geodino.models.registry import ARCHS
from geodino.models.weights import infer_arch


@pytest.fixture
def warnings_of_geodino():
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("geodino")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_a_registry_name_without_weights_warns_once_per_load(warnings_of_geodino, tmp_path):
    load_backbone("geodino_vit_tiny", in_chans=4)
    msgs = [r.getMessage() for r in warnings_of_geodino if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "geodino_vit_tiny" in msgs[0] and "RANDOM" in msgs[0]
    warnings_of_geodino.clear()
    path = export_backbone(build_backbone("geodino_vit_tiny"), tmp_path / "w.pth")
    load_backbone("geodino_vit_tiny", weights=path)
    build_backbone("geodino_vit_tiny")  # training from scratch: quiet
    load_backbone(path)
    assert [r.getMessage() for r in warnings_of_geodino] == []


def test_the_architecture_of_every_registry_entry_is_read_off_its_keys():
    for name, entry in ARCHS.items():
        sd = build_backbone(name, device="meta").state_dict()
        found, kwargs = infer_arch(sd, name)
        assert kwargs == entry["kwargs"], name
        assert ARCHS[found]["kwargs"] == entry["kwargs"]
    # untied cls norms tell the SAT-493M ViT-L from the web one
    assert infer_arch(build_backbone("dinov3_vitl16_sat493m", device="meta").state_dict())[0] == "dinov3_vitl16_sat493m"
    assert infer_arch(build_backbone("dinov3_vitl16", device="meta").state_dict())[0] == "dinov3_vitl16"
    # changed sizes are read too
    sd = build_backbone("dinov3_vits16", device="meta", in_chans=13, n_storage_tokens=0, patch_size=8).state_dict()
    name, kw = infer_arch(sd)
    assert name == "dinov3_vits16" and (kw["in_chans"], kw["n_storage_tokens"], kw["patch_size"]) == (13, 0, 8)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_an_official_file_loads_by_its_path(tmp_path, family):
    torch.manual_seed(0)
    if family == "vit":
        model = build_backbone("geodino_vit_tiny", in_chans=5, ffn_layer="swiglu", qkv_bias=False)
    else:
        model = build_backbone("geodino_convnext_tiny", in_chans=5)
    path = export_backbone(model, tmp_path / "official.pth", "official")
    loaded = load_backbone(path)
    assert loaded.geodino_contract.in_chans == 5
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 5, 64, 64)
    torch.testing.assert_close(loaded.forward_features(x)["x_norm_clstoken"],
                               model.eval().forward_features(x)["x_norm_clstoken"])
    # the same flat dict saved as .pt loads too
    torch.save(model.state_dict(), tmp_path / "flat.pt")
    assert load_backbone(tmp_path / "flat.pt").geodino_contract.kwargs == loaded.geodino_contract.kwargs


def test_heads_that_the_keys_cannot_tell_are_a_clear_error(tmp_path):
    model = build_backbone("geodino_vit_tiny", embed_dim=64, depth=1, num_heads=2)
    path = export_backbone(model, tmp_path / "odd.pth", "official")
    with pytest.raises(CheckpointError, match=r"embed_dim 64 and depth 1: its number of attention heads .* "
                                              r"pass num_heads="):
        load_backbone(path)
    loaded = load_backbone(path, num_heads=2)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_features(x)["x_norm_clstoken"],
                               model.eval().forward_features(x)["x_norm_clstoken"])
