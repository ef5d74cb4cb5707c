"""Behaviour of the native DINOv3 ViT beyond the reference tensors: list forward, masking, train-time RoPE draws,
sample-drop stochastic depth, untied norms, shape checks, official sizes on meta, gradients and checkpointing."""

from __future__ import annotations

import pytest
import torch
from geodino.testing import assert_close_rel

from geodino.models import DinoVisionTransformer, dinov3_vit

TINY = dict(
    patch_size=16,
    embed_dim=64,
    depth=2,
    num_heads=2,
    ffn_ratio=2,
    n_storage_tokens=2,
    layerscale_init=0.1,
    norm_layer="layernormbf16",
    mask_k_bias=True,
    pos_embed_rope_dtype="fp32",
)


def tiny(seed: int = 0, **overrides) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    model = dinov3_vit(**{**TINY, **overrides})
    with torch.no_grad():  # random biases/norms/LayerScale so that nothing is trivially zero or one
        for name, p in model.named_parameters():
            if name != "mask_token":
                p.add_(torch.randn_like(p) * 0.05)
            else:
                p.normal_(std=0.5)
    return model


def test_list_forward_equals_separate_forwards_in_eval():
    model = tiny().eval()
    g, l = torch.randn(2, 3, 64, 48), torch.randn(3, 3, 32, 32)
    mg = torch.rand(2, 12) < 0.4
    with torch.no_grad():
        outs = model.forward_features([g, l], [mg, None])
        sep = [model.forward_features(g, masks=mg), model.forward_features(l)]
    assert isinstance(outs, list) and len(outs) == 2
    for out, ref in zip(outs, sep):
        assert set(out) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            assert_close_rel(out[key], ref[key], what=key)
    assert outs[0]["masks"] is mg and outs[1]["masks"] is None
    assert outs[0]["x_storage_tokens"].shape == (2, 2, 64)
    assert outs[1]["x_norm_patchtokens"].shape == (3, 4, 64)
    with pytest.raises(ValueError, match="masks"):
        model.forward_features([g, l], [mg])


def test_masked_patches_only_see_the_mask_token():
    model = tiny().eval()
    x = torch.randn(2, 3, 48, 64)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[0, [0, 5, 7]] = True
    masks[1, [11]] = True
    # Change the pixels under the masked patches only: outputs must not move.
    x2 = x.clone().view(2, 3, 3, 16, 4, 16)
    for b, idx in ((0, [0, 5, 7]), (1, [11])):
        for i in idx:
            x2[b, :, i // 4, :, i % 4, :] = torch.randn(3, 16, 16) * 5
    x2 = x2.view(2, 3, 48, 64)
    with torch.no_grad():
        a = model.forward_features(x, masks=masks)["x_norm_patchtokens"]
        b = model.forward_features(x2, masks=masks)["x_norm_patchtokens"]
        assert torch.equal(a, b)
        unmasked = [model.forward_features(t)["x_norm_patchtokens"] for t in (x, x2)]
        assert not torch.equal(*unmasked)
        # An all-False mask is the unmasked forward.
        none = model.forward_features(x)["x_norm_patchtokens"]
        assert torch.equal(model.forward_features(x, masks=torch.zeros_like(masks))["x_norm_patchtokens"], none)
        # Changing the mask token changes the masked forward.
        model.mask_token.add_(1.0)
        assert not torch.allclose(model.forward_features(x, masks=masks)["x_norm_patchtokens"], a)
    with pytest.raises(ValueError, match="masks must have shape"):
        model.forward_features(x, masks=masks[:, :5])


def test_train_rope_is_drawn_per_block_and_per_group():
    model = tiny(pos_embed_rope_rescale_coords=2).train()
    g, l = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 16, 32)
    calls = []
    orig = model.rope_embed.forward

    def counting(*, H, W):
        calls.append((H, W))
        return orig(H=H, W=W)

    model.rope_embed.forward = counting
    torch.manual_seed(123)
    out1 = model.forward_features([g, l])
    assert calls == [(2, 3), (1, 2)] * TINY["depth"]  # official order: per block, then per crop group
    torch.manual_seed(123)
    out2 = model.forward_features([g, l])
    for a, b in zip(out1, out2):
        assert torch.equal(a["x_norm_patchtokens"], b["x_norm_patchtokens"])  # same seed, same draws
    # The same computation spelled out: a fresh draw per block and per group, in that order.
    torch.manual_seed(123)
    xs = [model.prepare_tokens_with_masks(t)[0] for t in (g, l)]
    for blk in model.blocks:
        ropes = [orig(H=2, W=3), orig(H=1, W=2)]
        xs = [blk(x, r) for x, r in zip(xs, ropes)]
    for out, x in zip(out1, xs):
        assert_close_rel(out["x_prenorm"], x, what="manual per-block RoPE loop")
    # A single draw per forward (timm's behaviour) gives something else.
    torch.manual_seed(123)
    once = [orig(H=2, W=3), orig(H=1, W=2)]
    xs1 = [model.prepare_tokens_with_masks(t)[0] for t in (g, l)]
    for blk in model.blocks:
        xs1 = [blk(x, r) for x, r in zip(xs1, once)]
    assert not torch.allclose(xs1[0], out1[0]["x_prenorm"])
    # Eval: no augmentation, one table per resolution, differs from the augmented training output.
    model.eval()
    calls.clear()
    with torch.no_grad():
        ev = model.forward_features([g, l])
    assert calls == [(2, 3), (1, 2)]
    assert not torch.allclose(ev[0]["x_norm_patchtokens"], out1[0]["x_norm_patchtokens"])


def test_train_mode_without_randomness_equals_eval():
    model = tiny()  # no RoPE augmentation, no drop path
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.train().forward_features(x)["x_norm_patchtokens"]
        b = model.eval().forward_features(x)["x_norm_patchtokens"]
    assert torch.equal(a, b)


def test_sample_drop_stochastic_depth():
    """Official batch-subset drop path: each branch updates max(int(B(1-p)),1) samples, scaled by B/subset."""
    model = tiny(depth=1, drop_path_rate=0.75).train()
    blk = model.blocks[0]
    assert blk.sample_drop_ratio == 0.75
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    out = model.forward_features(x)["x_prenorm"]
    with torch.no_grad():
        torch.manual_seed(7)
        tokens, (H, W) = model.prepare_tokens_with_masks(x)
        rope = model.rope_embed(H=H, W=W)
        i1 = torch.randperm(4)[:1]
        x1 = tokens.clone()
        x1[i1] += 4.0 * blk.ls1(blk.attn(blk.norm1(tokens[i1]), rope))
        i2 = torch.randperm(4)[:1]
        x2 = x1.clone()
        x2[i2] += 4.0 * blk.ls2(blk.mlp(blk.norm2(x1[i2])))
    assert_close_rel(out, x2, what="sample drop")
    untouched = [b for b in range(4) if b not in (i1.item(), i2.item())]
    assert len(untouched) >= 2
    assert torch.equal(out[untouched], tokens[untouched])
    # Same rate for every block (no linear ramp), and no dropping at eval.
    deep = tiny(depth=3, drop_path_rate=0.3)
    assert [b.sample_drop_ratio for b in deep.blocks] == [0.3, 0.3, 0.3]
    deep.eval()
    with torch.no_grad():
        assert torch.equal(deep(x), deep(x))


def test_untied_norms():
    model = tiny(untie_global_and_local_cls_norm=True, untie_cls_and_patch_norms=True)
    with torch.no_grad():
        model.local_cls_norm.weight.mul_(3.0)
        model.cls_norm.weight.mul_(2.0)
    g, l = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)
    r = 1 + TINY["n_storage_tokens"]
    with torch.no_grad():
        for training in (True, False):
            model.train(training)
            outs = model.forward_features([g, l])
            for idx, out in enumerate(outs):
                xp = out["x_prenorm"]
                cls_norm = model.local_cls_norm if (training and idx == 1) else model.cls_norm
                assert_close_rel(out["x_norm_clstoken"], cls_norm(xp[:, :r])[:, 0], what=f"cls {training} {idx}")
                assert_close_rel(out["x_storage_tokens"], cls_norm(xp[:, :r])[:, 1:], what="storage")
                assert_close_rel(out["x_norm_patchtokens"], model.norm(xp[:, r:]), what="patch")
        # Intermediate layers use cls_norm for the prefix, never local_cls_norm.
        model.eval()
        (patch, cls, extra), = model.get_intermediate_layers(g, n=1, return_class_token=True, return_extra_tokens=True)
        ref = model.forward_features(g)
        assert_close_rel(cls, ref["x_norm_clstoken"], what="intermediate cls")
        assert_close_rel(extra, ref["x_storage_tokens"], what="intermediate storage")
        assert_close_rel(patch, ref["x_norm_patchtokens"], what="intermediate patch")
    sd = model.state_dict()
    assert list(sd)[-4:] == ["cls_norm.weight", "cls_norm.bias", "local_cls_norm.weight", "local_cls_norm.bias"]


def test_forward_and_intermediate_layer_api():
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model(x), feats["x_norm_clstoken"])
        assert isinstance(model(x, is_training=True), dict)
        assert isinstance(model([x, x], is_training=True), list)
        (p,) = model.get_intermediate_layers(x)
        assert p.shape == (2, 6, 64)
        assert_close_rel(p, feats["x_norm_patchtokens"], what="last layer")
        outs = model.get_intermediate_layers(
            x, n=[0, 2], reshape=True, return_class_token=True, return_extra_tokens=True
        )
        assert [tuple(t.shape) for t in outs[0]] == [(2, 64, 2, 3), (2, 64), (2, 2, 64)]
        assert_close_rel(outs[1][1], feats["x_norm_clstoken"], what="block 2 cls")
        raw = model.get_intermediate_layers(x, n=1, norm=False, return_class_token=True)
        assert torch.equal(raw[0][1], feats["x_prenorm"][:, 0])
        # int n = the last n blocks, in order
        two = model.get_intermediate_layers(x, n=2)
        idx = model.get_intermediate_layers(x, n=[1, 2])
        assert all(torch.equal(a, b) for a, b in zip(two, idx))
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[3])


def test_non_multiple_of_patch_size_raises():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"\(1, 3, 60, 64\).*multiples of patch_size 16"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model.get_intermediate_layers(torch.randn(1, 3, 64, 70))


def test_thirteen_band_input():
    model = tiny(in_chans=13).eval()
    assert model.patch_embed.proj.weight.shape == (64, 13, 16, 16)
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 13, 32, 48))
    assert out["x_norm_patchtokens"].shape == (2, 6, 64)
    assert torch.isfinite(out["x_norm_clstoken"]).all()


def test_init_weights_follow_the_reference():
    torch.manual_seed(0)
    model = dinov3_vit(**{**TINY, "embed_dim": 128, "num_heads": 2})
    assert torch.all(model.mask_token == 0)
    assert abs(model.cls_token.std().item() - 0.02) < 0.01
    qkv = model.blocks[0].attn.qkv
    assert torch.all(qkv.bias == 0) and abs(qkv.weight.std().item() - 0.02) < 0.002
    assert qkv.bias_mask.tolist() == [1.0] * 128 + [0.0] * 128 + [1.0] * 128
    assert torch.all(model.blocks[1].ls2.gamma == 0.1)
    bound = (1 / (3 * 16 * 16)) ** 0.5
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    periods = model.rope_embed.periods.clone()
    with torch.no_grad():
        model.rope_embed.periods.fill_(3.0)
        model.blocks[0].attn.qkv.bias_mask.fill_(float("nan"))
    model.init_weights()
    assert torch.equal(model.rope_embed.periods, periods)
    assert not torch.isnan(model.blocks[0].attn.qkv.bias_mask).any()
    # Other norm / FFN flavours build with their official keys.
    m = dinov3_vit(**{**TINY, "norm_layer": "rmsnorm", "ffn_layer": "swiglu64", "ffn_bias": False})
    assert m.blocks[0].mlp.w1.weight.shape == (128, 64)  # int(64*2*2/3)=85 -> 128 (align 64)
    assert "blocks.0.norm1.bias" not in m.state_dict() and "blocks.0.mlp.w3.bias" not in m.state_dict()
    assert dinov3_vit(**{**TINY, "layerscale_init": None}).blocks[0].ls1.__class__.__name__ == "Identity"


# (name, kwargs, params in millions, state-dict keys)
OFFICIAL_SIZES = [
    ("vits16", dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4), 21.60, 188),
    ("vits16plus", dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"), 28.70, 212),
    ("vitb16", dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4), 85.67, 188),
    ("vitl16", dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4), 303.15, 368),
    (
        "vitl16_sat",
        dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4, untie_global_and_local_cls_norm=True),
        303.16,  # + local_cls_norm (2 x 1024)
        370,
    ),
    ("vitl16plus", dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6, ffn_layer="swiglu"), 403.92, None),
    ("vith16plus", dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6, ffn_layer="swiglu"), 840.63, None),
    (
        "vit7b16",
        dict(
            embed_dim=4096,
            depth=40,
            num_heads=32,
            ffn_ratio=3,
            ffn_layer="swiglu64",
            qkv_bias=False,
            untie_global_and_local_cls_norm=True,
        ),
        6716.04,
        610,
    ),
]
HUB_COMMON = dict(
    patch_size=16,
    n_storage_tokens=4,
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    mask_k_bias=True,
    pos_embed_rope_base=100,
    pos_embed_rope_rescale_coords=2,
    pos_embed_rope_dtype="fp32",
)


@pytest.mark.parametrize("name,kwargs,millions,n_keys", OFFICIAL_SIZES, ids=[s[0] for s in OFFICIAL_SIZES])
def test_official_sizes_on_meta(name, kwargs, millions, n_keys):
    model = dinov3_vit(**HUB_COMMON, **kwargs, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == millions
    sd = model.state_dict()
    if n_keys is not None:
        assert len(sd) == n_keys
    assert list(sd)[:6] == [
        "cls_token",
        "storage_tokens",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "rope_embed.periods",
    ]
    head_dim = kwargs["embed_dim"] // kwargs["num_heads"]
    assert sd["rope_embed.periods"].shape == (head_dim // 4,)
    assert sd["mask_token"].shape == (1, kwargs["embed_dim"])
    has_bias = kwargs.get("qkv_bias", True)
    assert ("blocks.0.attn.qkv.bias_mask" in sd) == has_bias and ("blocks.0.attn.qkv.bias" in sd) == has_bias


def test_vits16_key_names_are_the_official_table():
    sd = dinov3_vit(**HUB_COMMON, **OFFICIAL_SIZES[0][1], device="meta").state_dict()
    per_block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask", "attn.proj.weight",
        "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
    ]  # fmt: skip
    expected = ["cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += ["rope_embed.periods"]
    expected += [f"blocks.{i}.{k}" for i in range(12) for k in per_block]
    expected += ["norm.weight", "norm.bias"]
    assert list(sd) == expected
    assert sd["blocks.3.mlp.fc1.weight"].shape == (1536, 384) and sd["blocks.3.attn.qkv.bias_mask"].shape == (1152,)


def test_backward_masks_the_key_bias_and_reaches_the_mask_token():
    model = tiny(pos_embed_rope_rescale_coords=2, drop_path_rate=0.2).train()
    g, l = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    mg = torch.rand(4, 4) < 0.5
    mg[0, 0] = True
    outs = model.forward_features([g, l], [mg, None])
    loss = sum(o["x_norm_clstoken"].pow(2).sum() + o["x_norm_patchtokens"].pow(2).mean() for o in outs)
    loss.backward()
    for blk in model.blocks:
        grad = blk.attn.qkv.bias.grad
        d = TINY["embed_dim"]
        assert torch.all(grad[d : 2 * d] == 0)  # key bias: masked out, zero gradient
        assert grad[:d].abs().sum() > 0 and grad[2 * d :].abs().sum() > 0
        assert blk.attn.qkv.bias_mask.grad is None and not blk.attn.qkv.bias_mask.requires_grad
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter is in the graph"


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    g, l = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    mg = torch.rand(4, 4) < 0.5
    grads = []
    for ckpt in (False, True):
        model = tiny(pos_embed_rope_rescale_coords=2, drop_path_rate=0.25).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(42)  # same RoPE and sample-drop draws; checkpoint replays the RNG for recomputation
        outs = model.forward_features([g, l], [mg, None])
        sum(o["x_norm_patchtokens"].pow(2).mean() + o["x_norm_clstoken"].sum() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close_rel(grads[1][name], grads[0][name], rtol=1e-5, what=f"grad {name}")
