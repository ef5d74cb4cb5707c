"""Named sizes, official-weight loading (zero renaming), clear errors, band adaptation, export round trips."""

from __future__ import annotations

import pytest
import torch

from geodino.errors import CheckpointError
from geodino.models import adapt_patch_embed, build_backbone, export_backbone, load_backbone, read_state_dict, registry
from geodino.models.registry import ARCHS, RELEASED_PARAMS_M

from geodino.testing import assert_close_rel, fp32_state_dict


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS_M))
def test_released_sizes_have_official_parameter_counts(name):
    model = build_backbone(name, device="meta")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(n, 2) == pytest.approx(RELEASED_PARAMS_M[name], abs=0.006), name


def test_key_counts_match_official_checkpoints():
    assert len(build_backbone("dinov3_vits16", device="meta").state_dict()) == 188
    assert len(build_backbone("dinov3_vitl16", device="meta").state_dict()) == 368
    assert len(build_backbone("dinov3_vitl16_sat493m", device="meta").state_dict()) == 370
    assert len(build_backbone("dinov3_vit7b16", device="meta").state_dict()) == 610
    assert len(build_backbone("dinov3_vits16plus", device="meta").state_dict()) == 212


@pytest.mark.parametrize("name", ["dinov3_convnext_tiny", "dinov3_convnext_small", "dinov3_convnext_base", "dinov3_convnext_large"])
def test_convnext_sizes_build(name):
    expected = {"dinov3_convnext_tiny": 27.8, "dinov3_convnext_small": 49.5, "dinov3_convnext_base": 87.6,
                "dinov3_convnext_large": 196.2}[name]
    model = build_backbone(name, device="meta")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(expected, abs=0.1)


@pytest.fixture()
def official_vit_file(load_ref, tmp_path):
    ref = load_ref("vit_small_depth2")
    path = tmp_path / "dinov3_vits16_depth2.pth"
    torch.save(fp32_state_dict(ref["state_dict"]), path)
    return ref, path


def test_load_official_file_with_zero_renaming(official_vit_file):
    ref, path = official_vit_file
    model = load_backbone("dinov3_vits16", weights=path, depth=2)
    sd = model.state_dict()
    assert set(sd) == set(ref["state_dict"])
    # the checkpoint's bf16-rounded RoPE periods are used, not recomputed
    assert torch.equal(sd["rope_embed.periods"], ref["state_dict"]["rope_embed.periods"].float())
    case = ref["cases"][0]
    with torch.no_grad():
        out = model.forward_features(case["x"])
    assert_close_rel(out["x_norm_clstoken"], case["x_norm_clstoken"], what="cls")
    assert_close_rel(out["x_norm_patchtokens"], case["x_norm_patchtokens"], what="patch")


def test_wrong_size_error_names_keys_and_likely_model(official_vit_file):
    _, path = official_vit_file
    with pytest.raises(CheckpointError) as e:
        load_backbone("dinov3_vitb16", weights=path)
    msg = str(e.value)
    assert "shape mismatch" in msg and "cls_token" in msg
    assert "embed_dim 384, depth 2" in msg
    with pytest.raises(CheckpointError) as e:
        load_backbone("dinov3_vits16", weights=path)  # depth 12 model, depth-2 file
    assert "missing key" in str(e.value) and "blocks.2." in str(e.value)


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone("dinov3_vits16", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_backbone("dinov3_vits16", weights=bad)
    with pytest.raises(CheckpointError, match="never downloads"):
        read_state_dict("https://dl.fbaipublicfiles.com/dinov3/x.pth")
    with pytest.raises(CheckpointError, match="unknown backbone"):
        load_backbone("dinov3_vitz16")


def test_export_official_round_trip_is_exact(official_vit_file, tmp_path):
    _, path = official_vit_file
    model = load_backbone("dinov3_vits16", weights=path, depth=2)
    out = export_backbone(model, tmp_path / "exported.pth", "official")
    sd = torch.load(out, weights_only=True)
    ref = torch.load(path, weights_only=True)
    assert list(sd) == list(ref) or set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    st = export_backbone(model, tmp_path / "exported.safetensors", "safetensors")
    back = load_backbone(st)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.geodino_contract.kwargs["depth"] == 2


def test_band_adaptation_rule():
    w = torch.randn(8, 3, 16, 16)
    new, rule = adapt_patch_embed(w, 13, rgb_indices=(3, 2, 1))
    assert new.shape == (8, 13, 16, 16)
    s = 3 / 13
    torch.testing.assert_close(new[:, 3], w[:, 0] * s)
    torch.testing.assert_close(new[:, 2], w[:, 1] * s)
    torch.testing.assert_close(new[:, 1], w[:, 2] * s)
    torch.testing.assert_close(new[:, 0], w.mean(1) * s)
    torch.testing.assert_close(new[:, 12], w.mean(1) * s)
    assert rule["rule"] == "rgb_kept_extra_from_rgb_mean_rescaled" and rule["scale"] == pytest.approx(s)
    # a constant input over all bands gives the RGB model's response to that constant
    x13, x3 = torch.ones(1, 13, 16, 16), torch.ones(1, 3, 16, 16)
    y13 = torch.nn.functional.conv2d(x13, new)
    y3 = torch.nn.functional.conv2d(x3, w)
    torch.testing.assert_close(y13, y3, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_chans,bands", [(4, ["R", "G", "B", "NIR"]), (13, None)])
def test_rgb_weights_into_multiband_model(official_vit_file, in_chans, bands):
    _, path = official_vit_file
    from geodino.data.sample import SENTINEL2_BANDS

    bands = bands or list(SENTINEL2_BANDS)
    model = load_backbone("dinov3_vits16", weights=path, depth=2, in_chans=in_chans, bands=bands)
    c = model.geodino_contract
    assert c.in_chans == in_chans and c.bands == bands
    assert c.band_adaptation["rule"] == "rgb_kept_extra_from_rgb_mean_rescaled"
    rgb = c.band_adaptation["rgb_indices"]
    assert rgb == ([0, 1, 2] if in_chans == 4 else [3, 2, 1])
    w = model.state_dict()["patch_embed.proj.weight"]
    ref_w = torch.load(path, weights_only=True)["patch_embed.proj.weight"]
    torch.testing.assert_close(w[:, rgb[0]], ref_w[:, 0] * 3 / in_chans)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, in_chans, 32, 48))
    assert out["x_norm_patchtokens"].shape == (1, 6, 384)
    assert len(c.mean) == in_chans


def test_every_arch_has_a_contract_that_round_trips():
    from geodino.contract import Contract

    for name in ARCHS:
        c = build_backbone(name, device="meta").geodino_contract
        d = c.to_dict()
        for key in ("kwargs", "bands", "mean", "std", "input_scale", "patch_size", "family", "in_chans"):
            assert key in d, (name, key)
        assert Contract.from_dict(d) == c
        assert len(c.mean) == len(c.std) == len(c.bands) == c.in_chans
    assert registry.ARCHS["dinov3_vitl16_sat493m"]["mean"] == (0.430, 0.411, 0.296)
    assert build_backbone("dinov3_vitl16_sat493m", device="meta").geodino_contract.mean == [0.430, 0.411, 0.296]


def test_export_cli(tmp_path, official_vit_file, capsys):
    from geodino import cli

    _, path = official_vit_file
    model = load_backbone("dinov3_vits16", weights=path, depth=2)
    st = export_backbone(model, tmp_path / "m.safetensors", "safetensors")
    assert cli.main(["export", f"checkpoint={st}", "format=official", f"out={tmp_path / 'o.pth'}"]) == 0
    sd = torch.load(tmp_path / "o.pth", weights_only=True)
    for k, v in torch.load(path, weights_only=True).items():
        assert torch.equal(sd[k], v)
    assert cli.main(["export", f"checkpoint={tmp_path / 'missing.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "no such file or run directory" in err and "missing.pt" in err and "Traceback" not in err


def test_public_api_reexports():
    import geodino

    assert geodino.load_backbone is load_backbone
    assert geodino.build_backbone is build_backbone
    m = geodino.build_backbone("geodino_vit_tiny", in_chans=4)
    assert m.geodino_contract.in_chans == 4


def test_set_stochastic_depth_on_vit_and_convnext():
    from geodino.models import set_stochastic_depth

    vit = build_backbone("geodino_vit_tiny")
    assert all(b.sample_drop_ratio == 0.0 for b in vit.blocks)
    set_stochastic_depth(vit, 0.3)
    assert [b.sample_drop_ratio for b in vit.blocks] == [0.3] * len(vit.blocks)  # same rate per block (reference)
    assert vit.geodino_contract.kwargs.get("drop_path_rate", 0.0) == 0.0  # a training setting, not architecture
    conv = build_backbone("geodino_convnext_tiny")
    set_stochastic_depth(conv, 0.2)
    rates = [b.drop_path for stage in conv.stages for b in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)  # linear ramp (reference ConvNeXt)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    # what the constructor does with drop_path_rate
    ref = build_backbone("geodino_convnext_tiny", drop_path_rate=0.2)
    assert rates == pytest.approx([b.drop_path for stage in ref.stages for b in stage])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_stochastic_depth(vit, 1.0)
    with pytest.raises(ValueError, match="no ViT or ConvNeXt blocks"):
        set_stochastic_depth(torch.nn.Linear(2, 2), 0.1)


def test_sample_drop_runs_each_branch_on_the_reference_subset():
    """With rate p, each residual branch sees max(int(B(1-p)), 1) samples (reference sample drop)."""
    from geodino.models import set_stochastic_depth

    vit = set_stochastic_depth(build_backbone("geodino_vit_tiny"), 0.3).train()
    seen = []
    vit.blocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].numel() // i[0].shape[-1]))
    vit.forward_features([torch.randn(8, 3, 32, 32), torch.randn(32, 3, 16, 16)], [None, None])
    assert len(seen) == 1
    n_prefix = 1 + vit.n_storage_tokens
    assert seen[0] == 5 * (n_prefix + 4) + 22 * (n_prefix + 1)  # int(8 * 0.7) = 5, int(32 * 0.7) = 22
    vit.eval()
    seen.clear()
    vit.forward_features(torch.randn(8, 3, 32, 32))
    assert seen == [8 * (n_prefix + 4)]  # no drop in eval mode
