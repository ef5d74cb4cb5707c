"""The timm-compatible surface of geodino backbones (issue #15): `pretrained_cfg` from the contract (timm's data
config reads it), `forward_intermediates` with timm's signature, `feature_info`, `transforms_for(model)` applying the
contract's numbers, and `torch.hub.load(<repo>, name, source="local", weights=...)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import geodino
from geodino.models import build_backbone, export_backbone

ROOT = Path(__file__).resolve().parents[2]


def _contracted(name="geodino_vit_tiny"):
    torch.manual_seed(0)
    m = build_backbone(name, in_chans=4).eval()
    m.geodino_contract = m.geodino_contract.with_data(bands=["B02", "B03", "B04", "B08"], mean=[0.1, 0.2, 0.3, 0.4],
                                                      std=[0.5, 0.6, 0.7, 0.8], scale=10000.0, offset=-1000.0)
    return m


def test_pretrained_cfg_comes_from_the_contract_and_timm_reads_it():
    from timm.data import resolve_data_config

    m = _contracted()
    cfg = resolve_data_config(model=m)
    assert cfg["input_size"] == (4, 224, 224) and cfg["mean"] == (0.1, 0.2, 0.3, 0.4)
    assert cfg["std"] == (0.5, 0.6, 0.7, 0.8) and cfg["crop_pct"] == 1.0
    assert m.pretrained_cfg["offset"] == -1000.0 and m.default_cfg == m.pretrained_cfg


def test_vit_forward_intermediates_follow_timm_and_match_the_official_outputs():
    m = _contracted()
    x = torch.randn(2, 4, 32, 48)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=2, norm=True)
        official = m.get_intermediate_layers(x, n=2, reshape=True, norm=True)
        feats = m.forward_features(x)
        only = m.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True,
                                       return_prefix_tokens=True)
    assert [t.shape for t in inter] == [(2, 96, 2, 3)] * 2
    for a, b in zip(inter, official):
        assert torch.equal(a, b)
    assert torch.allclose(final[:, 0], feats["x_norm_clstoken"], atol=1e-6)
    assert torch.allclose(final[:, 5:], feats["x_norm_patchtokens"], atol=1e-6)
    patches, prefix = only[0]
    assert patches.shape == (2, 6, 96) and prefix.shape == (2, 5, 96)
    assert [f["reduction"] for f in m.feature_info] == [16, 16]
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_convnext_forward_intermediates_give_each_stage_at_its_stride():
    m = _contracted("geodino_convnext_tiny")
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        feats = m.forward_features(x)
    assert [tuple(t.shape[1:]) for t in inter] == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (96, 2, 2)]
    assert [f["num_chs"] for f in m.feature_info] == [24, 48, 96, 96]
    assert torch.allclose(final.flatten(2).transpose(1, 2), feats["x_norm_patchtokens"], atol=1e-6)


def test_transforms_for_applies_the_contracts_offset_scale_clip_and_normalisation():
    m = _contracted()
    t = geodino.transforms_for(m)
    dn = np.array([[[[0, 1000, 3000, 20000]]]] * 4, dtype=np.uint16).reshape(4, 1, 4)
    got = t(dn[None])
    x01 = np.clip((dn.astype(np.float32) - 1000) / 10000, 0, 1)
    mean = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)[:, None, None]
    std = np.array([0.5, 0.6, 0.7, 0.8], dtype=np.float32)[:, None, None]
    assert np.allclose(got[0].numpy(), (x01 - mean) / std, atol=1e-6)
    assert torch.equal(t({"image": torch.from_numpy(dn[None].astype(np.int32))})["image"], got)  # torchgeo sample
    rgb = build_backbone("geodino_vit_tiny")  # no recorded scale: 8-bit data / 255
    out = geodino.transforms_for(rgb)(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(out[0, :, 0, 0], (1 - torch.tensor(rgb.geodino_contract.mean)) /
                          torch.tensor(rgb.geodino_contract.std))


def test_torch_hub_loads_a_registry_name_from_this_repository_with_local_weights(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("dinov3_vits16", depth=1)
    path = export_backbone(src, tmp_path / "w.safetensors", "safetensors")
    model = torch.hub.load(str(ROOT), "dinov3_vits16", source="local", weights=str(path), depth=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x)["x_norm_clstoken"], src.eval().forward_features(x)["x_norm_clstoken"])
    rand = torch.hub.load(str(ROOT), "geodino_vit_tiny", source="local", pretrained=False)
    assert rand.geodino_contract.name == "geodino_vit_tiny" and not rand.training
    with pytest.raises(ValueError, match="never downloads"):
        torch.hub.load(str(ROOT), "dinov3_vits16", source="local")


def test_transforms_for_reproduces_geodinos_reading_of_a_baseline_04_scene(tmp_path):
    """A Sentinel-2 file from processing baseline 04.00 (DN = 10000 * reflectance + 1000): the raster source detects
    the -1000 offset, the contract records it as numbers, and transforms_for(model) on the raw DN gives exactly what
    geodino feeds the backbone from the file."""
    import rasterio
    from fakes.rasters import write_tif

    from geodino.data.sources.raster import RasterSource

    refl = np.array([0.05, 0.1, 0.2, 0.35])
    dn = np.stack([np.full((32, 32), int(r * 10000 + 1000), np.uint16) for r in refl])
    dn[:, :4, :4] = 500  # dark pixels (DN below the offset) clip to 0
    path = write_tif(tmp_path / "s2.tif", dn, 32631, 600000, 5_000_640, 10.0, nodata=None,
                     descriptions=["B02", "B03", "B04", "B08"], tags={"PROCESSING_BASELINE": "04.00"})
    src = RasterSource([tmp_path], chip_size=32)
    assert (src.scale, src.offset) == (10000.0, -1000.0)
    m = _contracted()
    m.geodino_contract = m.geodino_contract.with_data(scale=src.scale, offset=src.offset)
    with rasterio.open(path) as f:
        raw = f.read()
    x = geodino.transforms_for(m)(raw)
    want = m.geodino_contract.normalize(torch.from_numpy(np.clip((raw.astype(np.float32) - 1000) / 10000, 0, 1)))
    assert torch.allclose(x, want, atol=1e-6)
    assert torch.allclose(m.geodino_contract.normalize(src[0]), x, atol=1e-5)  # the training reader agrees
    assert torch.allclose(x[:, 10, 10], (torch.tensor(refl, dtype=torch.float32) - torch.tensor(m.geodino_contract.mean))
                          / torch.tensor(m.geodino_contract.std), atol=1e-5)
