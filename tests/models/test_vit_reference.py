"""The native ViT reproduces every output of the official DINOv3 ViT (reference tensors, fp32, rel err <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from geodino.testing import assert_close_rel, fp32_state_dict

from geodino.models import DinoVisionTransformer, dinov3_vit

FILES = ["vit_small_depth2", "vit_swiglu_depth2"]


@pytest.fixture(scope="module", params=FILES)
def ref_model(request, load_ref):
    ref = load_ref(request.param)
    model = dinov3_vit(**ref["kwargs"]).eval()
    result = model.load_state_dict(fp32_state_dict(ref["state_dict"]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return request.param, ref, model


def test_strict_load_and_official_key_layout(ref_model):
    _, ref, model = ref_model
    assert isinstance(model, DinoVisionTransformer)
    sd = model.state_dict()
    # Same keys, same order, same shapes: state_dict() IS the official layout.
    assert list(sd) == list(ref["state_dict"])
    for k, v in ref["state_dict"].items():
        assert sd[k].shape == v.shape, k
    # The loaded (bf16-rounded) periods are the ones in use.
    assert torch.equal(model.rope_embed.periods, ref["state_dict"]["rope_embed.periods"].float())
    # bias_mask is loaded from the file: zeros over the key third only.
    mask = sd["blocks.0.attn.qkv.bias_mask"]
    d = mask.numel() // 3
    assert mask[:d].eq(1).all() and mask[d : 2 * d].eq(0).all() and mask[2 * d :].eq(1).all()


def _cases(ref):
    return list(enumerate(ref["cases"]))


@torch.no_grad()
def test_plain_forward(ref_model):
    name, ref, model = ref_model
    for i, case in _cases(ref):
        out = model.forward_features(case["x"])
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
            assert_close_rel(out[key], case[key], what=f"{name}[{i}].{key}")
        B, _, H, W = case["x"].shape
        n_prefix = 1 + ref["kwargs"]["n_storage_tokens"]
        assert out["x_prenorm"].shape == (B, n_prefix + (H // 16) * (W // 16), ref["kwargs"]["embed_dim"])
        assert out["masks"] is None
        assert_close_rel(model(case["x"]), case["x_norm_clstoken"], what=f"{name}[{i}].forward")


@torch.no_grad()
def test_masked_forward(ref_model):
    name, ref, model = ref_model
    for i, case in _cases(ref):
        masks = case["masks"]
        assert masks.dtype == torch.bool and masks.any() and not masks.all()
        out = model.forward_features(case["x"], masks=masks)
        assert_close_rel(out["x_norm_clstoken"], case["masked_x_norm_clstoken"], what=f"{name}[{i}].masked cls")
        assert_close_rel(out["x_norm_patchtokens"], case["masked_x_norm_patchtokens"], what=f"{name}[{i}].masked patch")
        assert out["masks"] is masks


@torch.no_grad()
def test_intermediate_layers(ref_model):
    name, ref, model = ref_model
    for i, case in _cases(ref):
        outs = model.get_intermediate_layers(case["x"], n=2, reshape=True, return_class_token=True, norm=True)
        assert len(outs) == 2
        for j, ((patch, cls), exp_patch, exp_cls) in enumerate(
            zip(outs, case["intermediate_patch"], case["intermediate_cls"])
        ):
            assert_close_rel(patch, exp_patch, what=f"{name}[{i}].intermediate_patch[{j}]")
            assert_close_rel(cls, exp_cls, what=f"{name}[{i}].intermediate_cls[{j}]")


@torch.no_grad()
def test_list_forward_matches_reference(ref_model):
    """Both reference cases in one list forward (different resolutions) give the same outputs."""
    name, ref, model = ref_model
    cases = ref["cases"]
    outs = model.forward_features([c["x"] for c in cases], [c["masks"] for c in cases])
    for i, (out, case) in enumerate(zip(outs, cases)):
        assert_close_rel(out["x_norm_clstoken"], case["masked_x_norm_clstoken"], what=f"{name}[{i}].list cls")
        assert_close_rel(out["x_norm_patchtokens"], case["masked_x_norm_patchtokens"], what=f"{name}[{i}].list patch")
