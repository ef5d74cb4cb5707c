"""dino.txt against the official reference tensors (`dinotxt_narrow.pt`): image and text features (raw and
normalised), exp(logit_scale), head and backbone patch tokens to 1e-5 relative; open_clip's tokenizer gives the
official token ids; the official key layout round-trips exactly."""

from __future__ import annotations

import pytest
import torch

from geodino.testing import assert_close_rel


@pytest.fixture(scope="module")
def ref(load_ref):
    return load_ref("dinotxt_narrow")


@pytest.fixture(scope="module")
def model(ref):
    from geodino.text.dinotxt import DinoTxt

    m = DinoTxt.from_official(ref["state_dict"], vit_kwargs=ref["vit_kwargs"], text_kwargs=ref["text_kwargs"],
                              dinotxt_config=ref["dinotxt_config"])
    return m.eval()


def test_tokenizer_matches_official_ids(ref):
    from geodino.text.dinotxt import get_tokenizer

    tokens = get_tokenizer(77)(ref["prompts"])
    assert tokens.dtype == ref["tokens"].dtype
    assert torch.equal(tokens, ref["tokens"])


def test_image_and_patch_features(ref, model):
    with torch.no_grad():
        feats, patches, backbone_patches = model.encode_image_with_patch_tokens(ref["images"])
        normed = model.encode_image(ref["images"], normalize=True)
    assert_close_rel(backbone_patches, ref["backbone_patch_tokens"], what="backbone_patch_tokens")
    assert_close_rel(patches, ref["patch_tokens"], what="patch_tokens")
    assert_close_rel(feats, ref["image_features"], what="image_features")
    assert_close_rel(normed, ref["image_features_normalized"], what="image_features_normalized")


def test_text_features_and_logit_scale(ref, model):
    with torch.no_grad():
        feats = model.encode_text(ref["tokens"])
        normed = model.encode_text(model.tokenize(ref["prompts"]), normalize=True)
        _, _, scale = model(ref["images"], ref["tokens"])
    assert_close_rel(feats, ref["text_features"], what="text_features")
    assert_close_rel(normed, ref["text_features_normalized"], what="text_features_normalized")
    assert_close_rel(scale.reshape(ref["logit_scale_exp"].shape), ref["logit_scale_exp"], what="logit_scale_exp")


def test_official_layout_round_trip(ref, model):
    out = model.to_official_state_dict()
    sd = ref["state_dict"]
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].shape == v.shape, k
        assert torch.equal(out[k].float(), v.float()), k


def test_head_has_no_rope_and_frozen_backbone(model):
    from geodino.text.dinotxt import DinoTxt

    head = model.visual_model.head
    assert len(head.blocks) == 2 and head.blocks[0].attn.qkv.bias is None
    assert head.linear_projection.weight.shape == (128, 192)  # 2 * 192 != 256: projection to 256 / 2
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # text attention: the zero in_proj_bias (absent from the official layout) is frozen
    assert not model.text_model.transformer.resblocks[0].attn.in_proj_bias.requires_grad
    assert isinstance(model, DinoTxt)


def test_official_file_with_a_separate_backbone(ref, model, tmp_path):
    """The released file holds the head and text tower only: load it on top of a backbone module."""
    from geodino.models.vit import dinov3_vit
    from geodino.testing import fp32_state_dict
    from geodino.text.dinotxt import DinoTxt

    sd = fp32_state_dict(ref["state_dict"])
    torch.save({k: v for k, v in sd.items() if not k.startswith("visual_model.backbone.")}, tmp_path / "head_text.pth")
    backbone = dinov3_vit(**ref["vit_kwargs"])
    backbone.load_state_dict({k[len("visual_model.backbone."):]: v for k, v in sd.items()
                              if k.startswith("visual_model.backbone.")})
    m = DinoTxt.from_official(tmp_path / "head_text.pth", backbone=backbone, text_kwargs=ref["text_kwargs"],
                              dinotxt_config=ref["dinotxt_config"]).eval()
    with torch.no_grad():
        assert_close_rel(m.encode_image(ref["images"]), ref["image_features"], what="image_features (file)")
        assert_close_rel(m.encode_text(ref["tokens"]), ref["text_features"], what="text_features (file)")
