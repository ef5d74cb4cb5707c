"""The native ConvNeXt reproduces the official DINOv3 ConvNeXt outputs and loads its keys strictly."""

from __future__ import annotations

import pytest
import torch
from geodino.testing import assert_close_rel, fp32_state_dict

from geodino.models import DinoConvNeXt, convnext
from geodino.models.convnext import CONVNEXT_SIZES


@pytest.fixture(scope="module")
def ref_convnext(load_ref):
    ref = load_ref("convnext_narrow")
    model = convnext(**ref["kwargs"]).eval()
    result = model.load_state_dict(fp32_state_dict(ref["state_dict"]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ref, model


def test_strict_load_and_keys(ref_convnext):
    ref, model = ref_convnext
    assert isinstance(model, DinoConvNeXt)
    sd = model.state_dict()
    assert list(sd) == list(ref["state_dict"])
    # norms.3 is the same module as norm, so both official names exist and stay tied.
    assert model.norms[3] is model.norm
    assert sd["norms.3.weight"].data_ptr() == sd["norm.weight"].data_ptr()
    assert model.embed_dim == 256


@torch.no_grad()
def test_forward_features_matches_reference(ref_convnext):
    ref, model = ref_convnext
    out = model.forward_features(ref["x"])
    for key, expected in ref["outputs"].items():
        if expected.numel() == 0:
            assert out[key].shape == expected.shape, key
        else:
            assert_close_rel(out[key], expected, what=f"convnext {key}")
    assert out["x_storage_tokens"].shape == (2, 0, 256)
    assert out["masks"] is None
    assert_close_rel(model(ref["x"]), ref["outputs"]["x_norm_clstoken"], what="forward")
    # list forward gives one dict per entry
    outs = model.forward_features([ref["x"], ref["x"][:1, :, :64, :96]])
    assert len(outs) == 2 and outs[1]["x_norm_patchtokens"].shape == (1, 2 * 3, 256)
    assert_close_rel(outs[0]["x_norm_patchtokens"], ref["outputs"]["x_norm_patchtokens"], what="list entry 0")


@torch.no_grad()
def test_intermediate_layers(ref_convnext):
    ref, model = ref_convnext
    x = ref["x"]  # 128 x 160
    # Last stage through norms[3] == norm: equals the forward_features tokens.
    (patch, cls), = model.get_intermediate_layers(x, n=1, return_class_token=True)
    assert_close_rel(patch, ref["outputs"]["x_norm_patchtokens"], what="intermediate n=1 patch")
    assert_close_rel(cls, ref["outputs"]["x_norm_clstoken"], what="intermediate n=1 cls")
    outs = model.get_intermediate_layers(x, n=[0, 3], reshape=True)
    assert [o.shape for o in outs] == [(2, 32, 32, 40), (2, 256, 4, 5)]
    # With patch_size set, maps are resized bilinearly (antialias) to the ViT grid H/16 x W/16.
    model.patch_size = 16
    try:
        outs = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
        assert [o[0].shape for o in outs] == [(2, 128, 8, 10), (2, 256, 8, 10)]
        assert [o[1].shape for o in outs] == [(2, 128), (2, 256)]
        flat = model.get_intermediate_layers(x, n=1, norm=False)
        assert flat[0].shape == (2, 80, 256)
    finally:
        model.patch_size = None
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[4])


@pytest.mark.parametrize("size,millions", [("tiny", 27.8), ("small", 49.5), ("base", 87.6), ("large", 196.2)])
def test_official_sizes_on_meta(size, millions):
    model = convnext(size, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == millions
    assert model.embed_dim == CONVNEXT_SIZES[size]["dims"][-1]
    assert all(p.is_meta for p in model.parameters())


def test_init_and_in_chans():
    torch.manual_seed(0)
    model = convnext(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], in_chans=13)
    blk = model.stages[0][0]
    assert torch.all(blk.gamma == 1e-6)
    assert torch.all(blk.pwconv1.bias == 0) and torch.all(model.downsample_layers[0][1].weight == 1)
    assert abs(model.stages[3][0].pwconv1.weight.std().item() - 0.02) < 0.004  # trunc-normal std .02
    out = model.forward_features(torch.randn(1, 13, 64, 64))
    assert out["x_norm_patchtokens"].shape == (1, 4, 32)
    with pytest.raises(ValueError, match="unknown ConvNeXt size"):
        convnext("huge")
