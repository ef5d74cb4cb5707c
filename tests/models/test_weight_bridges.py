"""Weight bridges (issue #15): timm and Hugging Face transformers DINOv3 ViTs load into geodino with the features of
the model that wrote them, and geodino's timm / HF exports load in their own library with the same features. All
weights are random models built here: nothing downloads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from geodino.models import build_backbone, export_backbone, load_backbone
from geodino.models.layouts import detect_layout
from geodino.models.registry import canonical_name

timm = pytest.importorskip("timm", reason="timm is a geodino dependency")

TOL = 1e-5
# geodino_vit_tiny's sizes (embed 96, depth 2, 3 heads) so that the registry entry is found from the keys


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases, layer scales and norms included), so that no renaming can pass by luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in n and
                                                                                             n.endswith("weight") else 0.0))
    return model.eval()


def _geodino_tokens(model, x):
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


def _timm_model(name="vit_small_patch16_dinov3_qkvb", **kw):
    return _randomize(timm.create_model(name, pretrained=False, embed_dim=96, depth=2, num_heads=3, num_classes=0,
                                        **kw))


@pytest.mark.parametrize("name,kw", [("vit_small_patch16_dinov3_qkvb", {}), ("vit_small_patch16_dinov3", {}),
                                     ("vit_small_plus_patch16_dinov3", {"in_chans": 5})])
def test_a_timm_file_loads_with_the_features_of_the_timm_model(tmp_path, name, kw):
    ref = _timm_model(name, **kw)
    c = kw.get("in_chans", 3)
    x = torch.randn(2, c, 48, 64)
    path = tmp_path / "timm.safetensors"
    save_file(ref.state_dict(), str(path))
    assert detect_layout(ref.state_dict()) == "timm"
    with torch.no_grad():
        want = ref.forward_features(x)
        got = _geodino_tokens(load_backbone(path), x)  # architecture from the keys
        assert (got - want).abs().max().item() <= TOL
        torch.save(ref.state_dict(), tmp_path / "timm.pth")  # a .pth (read with weights_only=True) too
        model = load_backbone("geodino_vit_tiny" if "plus" not in name else tmp_path / "timm.pth",
                              weights=tmp_path / "timm.pth")
        assert (_geodino_tokens(model, x) - want).abs().max().item() <= TOL


def test_a_geodino_backbone_exports_to_a_timm_folder_timm_reads(tmp_path):
    model = _randomize(build_backbone("geodino_vit_tiny", in_chans=4))
    model.geodino_contract = model.geodino_contract.with_data(bands=["B", "G", "R", "NIR"], mean=[0.3] * 4, std=[0.2] * 4)
    out = export_backbone(model, tmp_path / "timm_dir", "timm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_dinov3_qkvb" and cfg["pretrained_cfg"]["mean"] == [0.3] * 4
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 4, 32, 48)
    with torch.no_grad():
        want = _geodino_tokens(model, x)
        assert (theirs.forward_features(x) - want).abs().max().item() <= TOL
        back = load_backbone(out)  # and back into geodino, the contract with it
        assert back.geodino_contract == model.geodino_contract
        assert (_geodino_tokens(back, x) - want).abs().max().item() <= TOL


def test_timm_and_hf_names_are_aliases_of_registry_names():
    assert canonical_name("vit_small_patch16_dinov3") == "dinov3_vits16"
    assert canonical_name("vit_large_patch16_dinov3_qkvb.sat493m") == "dinov3_vitl16_sat493m"
    assert canonical_name("vit_large_patch16_dinov3.lvd1689m") == "dinov3_vitl16"
    assert canonical_name("facebook/dinov3-vitl16-pretrain-sat493m") == "dinov3_vitl16_sat493m"
    assert canonical_name("facebook/dinov3-convnext-tiny-pretrain-lvd1689m") == "dinov3_convnext_tiny"
    m = build_backbone("vit_small_plus_patch16_dinov3", device="meta")
    assert m.geodino_contract.name == "dinov3_vits16plus"


# -- Hugging Face transformers -----------------------------------------------------------------------------------
def _hf():
    return pytest.importorskip("transformers", reason="transformers is needed for the Hugging Face parity tests")


@pytest.mark.parametrize("gated", [False, True])
def test_an_hf_folder_and_file_load_with_the_features_of_the_hf_model(tmp_path, gated):
    tr = _hf()
    cfg = tr.DINOv3ViTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                             intermediate_size=256 if gated else 384,
                             num_register_tokens=4, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                             num_channels=3)
    ref = _randomize(tr.DINOv3ViTModel(cfg))
    ref.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        folder = load_backbone(tmp_path / "hf")  # config.json gives the heads
        assert folder.geodino_contract.kwargs["num_heads"] == 3
        assert (_geodino_tokens(folder, x) - want).abs().max().item() <= TOL
        model = load_backbone("geodino_vit_tiny" if not gated else tmp_path / "hf" / "model.safetensors",
                              weights=tmp_path / "hf" / "model.safetensors")
        assert (_geodino_tokens(model, x) - want).abs().max().item() <= TOL
    if not gated:  # a folder's config must agree with the name on what the weights cannot show
        assert load_backbone("geodino_vit_tiny", weights=tmp_path / "hf").geodino_contract.kwargs["num_heads"] == 3
        from geodino.errors import CheckpointError

        with pytest.raises(CheckpointError, match=r"num_heads=3 \(the name says 2\)"):
            load_backbone("geodino_vit_tiny", weights=tmp_path / "hf", num_heads=2)


def test_a_geodino_backbone_exports_to_an_hf_folder_transformers_reads(tmp_path):
    tr = _hf()
    for ffn in ("mlp", "swiglu"):
        model = _randomize(build_backbone("geodino_vit_tiny", ffn_layer=ffn), seed=1)
        out = export_backbone(model, tmp_path / f"hf_{ffn}", "hf")
        theirs, info = tr.DINOv3ViTModel.from_pretrained(out, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        x = torch.randn(2, 3, 32, 64)
        with torch.no_grad():
            want = _geodino_tokens(model, x)
            assert (theirs.eval()(pixel_values=x).last_hidden_state - want).abs().max().item() <= TOL
            back = load_backbone(out)
            assert back.geodino_contract == model.geodino_contract
            assert (_geodino_tokens(back, x) - want).abs().max().item() <= TOL


def test_what_a_layout_cannot_hold_is_refused_by_name(tmp_path):
    from geodino.errors import CheckpointError

    model = build_backbone("geodino_vit_tiny", untie_cls_and_patch_norms=True)
    for fmt in ("timm", "hf"):
        with pytest.raises(CheckpointError, match="untie_cls_and_patch_norms"):
            export_backbone(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    bare = build_backbone("geodino_convnext_tiny")
    del bare.geodino_contract
    with pytest.raises(CheckpointError, match="with a geodino contract"):
        export_backbone(bare, tmp_path / "c", "hf")


# -- ConvNeXt ------------------------------------------------------------------------------------------------------
def _convnext_outputs(model, x):
    out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def test_a_timm_convnext_loads_and_exports_with_its_features(tmp_path):
    ref = _randomize(timm.create_model("convnext_tiny", depths=[1, 1, 2, 1], dims=[24, 48, 96, 96], num_classes=0,
                                       in_chans=4))
    x = torch.randn(2, 4, 64, 96)
    save_file(ref.state_dict(), str(tmp_path / "timm.safetensors"))
    with torch.no_grad():
        pooled, maps = ref(x), ref.head.norm(ref.forward_features(x))
        model = load_backbone(tmp_path / "timm.safetensors")
        assert model.geodino_contract.name == "geodino_convnext_tiny"
        cls, patches = _convnext_outputs(model, x)
        assert (cls - pooled).abs().max().item() <= TOL
        assert (patches - maps.flatten(2).transpose(1, 2)).abs().max().item() <= TOL
        out = export_backbone(model, tmp_path / "timm_dir", "timm")
        theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert (theirs(x) - cls).abs().max().item() <= TOL
    assert canonical_name("convnext_base.dinov3_lvd1689m") == "dinov3_convnext_base"


def test_an_hf_convnext_loads_and_exports_with_its_features(tmp_path):
    tr = _hf()
    cfg = tr.DINOv3ConvNextConfig(hidden_sizes=[24, 48, 96, 96], depths=[1, 1, 2, 1], num_channels=3)
    ref = _randomize(tr.DINOv3ConvNextModel(cfg))
    ref.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state  # [pooled, patches] after the final norm
        model = load_backbone(tmp_path / "hf")
        cls, patches = _convnext_outputs(model, x)
        assert (torch.cat([cls[:, None], patches], 1) - want).abs().max().item() <= TOL
        out = export_backbone(model, tmp_path / "hf_out", "hf")
        theirs, info = tr.DINOv3ConvNextModel.from_pretrained(out, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert (theirs.eval()(pixel_values=x).last_hidden_state - want).abs().max().item() <= TOL


def test_geodino_export_writes_timm_and_hf_folders_and_replaces_them_only_with_overwrite(tmp_path, capsys):
    from geodino import cli
    from geodino.checkpoint import backbone_payload, save_atomic

    bb = _randomize(build_backbone("geodino_vit_tiny"))
    src = save_atomic(backbone_payload(bb.state_dict(), bb.geodino_contract), tmp_path / "bb.pt")
    for fmt in ("timm", "hf"):
        assert cli.main(["export", f"checkpoint={src}", f"format={fmt}"]) == 0
        out = tmp_path / f"backbone_teacher_{fmt}"
        assert sorted(p.name for p in out.iterdir())[0] == "config.json"
        assert cli.main(["export", f"checkpoint={src}", f"format={fmt}"]) == 2
        assert "exists; overwrite=true replaces it" in capsys.readouterr().err
        assert cli.main(["export", f"checkpoint={src}", f"format={fmt}", "overwrite=true"]) == 0
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert (_geodino_tokens(load_backbone(out), x) - _geodino_tokens(bb, x)).abs().max().item() <= TOL
    assert not list(tmp_path.glob(".*tmp*"))
