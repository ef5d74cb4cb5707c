"""RoPE: official sin/cos tables and periods, persistent loaded periods, train-time draws, rotate-half application."""

from __future__ import annotations

import math

import pytest
import torch
from geodino.testing import assert_close_rel

from geodino.models import RopePositionEmbedding
from geodino.models.rope import apply_rope, rope_rotate_half
from geodino.models.vit import _rope_qk


def test_reference_cases(load_ref):
    cases = load_ref("rope")
    assert len(cases) == 4
    seen = set()
    for i, c in enumerate(cases):
        rope = RopePositionEmbedding(
            c["embed_dim"], c["num_heads"], base=c["base"], normalize_coords=c["normalize_coords"]
        ).eval()
        assert rope.periods.shape == c["periods"].shape
        assert_close_rel(rope.periods, c["periods"], what=f"case {i} periods")
        sin, cos = rope(H=c["H"], W=c["W"])
        assert sin.shape == (c["H"] * c["W"], c["embed_dim"] // c["num_heads"])
        assert_close_rel(sin, c["sin"], what=f"case {i} sin")
        assert_close_rel(cos, c["cos"], what=f"case {i} cos")
        # Using the file's periods through the persistent buffer gives the same tables.
        rope.load_state_dict({"periods": c["periods"]}, strict=True)
        sin2, cos2 = rope(H=c["H"], W=c["W"])
        assert_close_rel(sin2, c["sin"], what=f"case {i} sin (loaded periods)")
        assert_close_rel(cos2, c["cos"], what=f"case {i} cos (loaded periods)")
        seen.add(c["normalize_coords"])
    assert seen == {"separate", "min", "max"}


def test_periods_buffer_is_persistent_and_loaded_values_are_used():
    rope = RopePositionEmbedding(384, 6).eval()
    assert list(rope.state_dict()) == ["periods"]
    fresh_sin, _ = rope(H=4, W=5)
    rounded = rope.periods.to(torch.bfloat16).float()  # what released checkpoints hold
    assert not torch.equal(rounded, rope.periods)
    rope.load_state_dict({"periods": rounded})
    assert torch.equal(rope.periods, rounded)
    sin, cos = rope(H=4, W=5)
    # Recompute by hand from the loaded periods: the buffer is used, not recomputed.
    coords_h = (torch.arange(4) + 0.5) / 4 * 2 - 1
    coords_w = (torch.arange(5) + 0.5) / 5 * 2 - 1
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), -1).flatten(0, 1)
    ang = (2 * math.pi * coords[:, :, None] / rounded).flatten(1).tile(2)
    assert torch.allclose(sin, ang.sin(), atol=1e-6) and torch.allclose(cos, ang.cos(), atol=1e-6)
    assert not torch.equal(sin, fresh_sin)
    # reset_parameters recomputes the official values.
    rope.reset_parameters()
    assert torch.equal(rope(H=4, W=5)[0], fresh_sin)


def test_period_forms_and_validation():
    rope = RopePositionEmbedding(64, 1, base=100.0)  # head_dim 64 -> 16 periods 100^(j/16)
    assert torch.allclose(rope.periods, 100.0 ** (torch.arange(16) / 16))
    mm = RopePositionEmbedding(64, 1, base=None, min_period=0.5, max_period=50.0)
    assert mm.periods[0].item() == pytest.approx(0.5) and mm.periods[-1].item() == pytest.approx(50.0)
    ratios = mm.periods[1:] / mm.periods[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        RopePositionEmbedding(64, 1, base=100.0, min_period=0.5, max_period=50.0)
    with pytest.raises(ValueError, match="exactly one"):
        RopePositionEmbedding(64, 1, base=None)
    with pytest.raises(ValueError, match="divisible"):
        RopePositionEmbedding(60, 2)
    assert RopePositionEmbedding(64, 1, dtype=torch.bfloat16).periods.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "aug", [dict(rescale_coords=2.0), dict(shift_coords=0.3, jitter_coords=1.5, rescale_coords=2.0)]
)
def test_train_draws_match_timm(aug):
    """timm's RotaryEmbeddingDinoV3 reproduces the official draws; same seed -> same tables."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    ours = RopePositionEmbedding(384, 6, **aug).train()
    theirs = RotaryEmbeddingDinoV3(
        64,
        temperature=100.0,
        shift_coords=aug.get("shift_coords"),
        jitter_coords=aug.get("jitter_coords"),
        rescale_coords=aug["rescale_coords"],
    ).train()
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        sin, cos = ours(H=6, W=9)
        torch.manual_seed(seed)
        emb = theirs.get_embed(shape=[6, 9])
        assert_close_rel(sin, emb[:, :64], what="train sin")
        assert_close_rel(cos, emb[:, 64:], what="train cos")
    # Eval: no augmentation and no RNG consumption.
    ours.eval()
    state = torch.get_rng_state()
    a = ours(H=6, W=9)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a[0], RopePositionEmbedding(384, 6).eval()(H=6, W=9)[0])


def test_train_without_augmentation_is_deterministic():
    rope = RopePositionEmbedding(128, 2).train()
    state = torch.get_rng_state()
    s1, _ = rope(H=3, W=3)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(s1, rope.eval()(H=3, W=3)[0])


def test_apply_rope_rotates_only_patch_tokens():
    torch.manual_seed(0)
    rope = RopePositionEmbedding(64, 2).eval()
    sin, cos = rope(H=3, W=4)
    x = torch.randn(2, 2, 5 + 12, 32)  # 5 prefix tokens (cls + 4 storage)
    y = apply_rope(x, sin, cos)
    assert torch.equal(y[..., :5, :], x[..., :5, :])
    expected = x[..., 5:, :] * cos + rope_rotate_half(x[..., 5:, :]) * sin
    assert torch.equal(y[..., 5:, :], expected)
    # Rotations preserve norms pairwise: |(x_d, x_{d+hd/2})| is unchanged.
    pairs = lambda t: t[..., :16] ** 2 + t[..., 16:] ** 2  # noqa: E731
    assert torch.allclose(pairs(y), pairs(x), atol=1e-5)
    assert torch.equal(rope_rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="tokens"):
        apply_rope(torch.randn(1, 1, 5, 32), sin, cos)


def test_fast_qk_rotation_equals_reference_formula():
    torch.manual_seed(0)
    rope = RopePositionEmbedding(96, 3).eval()
    sin, cos = rope(H=4, W=6)
    qkv = torch.randn(2, 5 + 24, 3, 3, 32).permute(2, 0, 3, 1, 4)  # strided, as inside attention
    ref = apply_rope(qkv[:2], sin, cos)
    fast = _rope_qk(qkv[:2], sin, cos)
    assert torch.equal(fast[..., :5, :], qkv[:2][..., :5, :])
    assert_close_rel(fast, ref, rtol=1e-6, what="fast rope")


def test_fast_qk_rotation_gradient_equals_reference_formula():
    """The hand-written backward (transposed rotation) gives autograd's gradient of the literal formula,
    including with train-time RoPE augmentation (different tables per call) and a strided input."""
    torch.manual_seed(0)
    rope = RopePositionEmbedding(96, 3, jitter_coords=2.0, rescale_coords=2.0).train()
    sin, cos = (t.double() for t in rope(H=4, W=6))
    qkv = torch.randn(2, 5 + 24, 3, 3, 32, dtype=torch.float64).permute(2, 0, 3, 1, 4).requires_grad_(True)
    grad = torch.randn(2, 2, 3, 5 + 24, 32, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(apply_rope(qkv[:2], sin, cos), qkv, grad)
    (g_fast,) = torch.autograd.grad(_rope_qk(qkv[:2], sin, cos), qkv, grad)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(g_fast[2], torch.zeros_like(g_fast[2]))  # v gets nothing from RoPE
    small_sin, small_cos = sin[:6], cos[:6]  # gradcheck perturbs every input: keep it small
    leaf = torch.randn(2, 1, 1, 2 + 6, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _rope_qk(t, small_sin, small_cos), (leaf,))


def test_bf16_rope_casts_like_reference():
    rope = RopePositionEmbedding(64, 2, dtype=torch.bfloat16).eval()
    sin, cos = rope(H=2, W=3)
    assert sin.dtype == torch.bfloat16
    x = torch.randn(1, 2, 1 + 6, 32)
    y = apply_rope(x, sin, cos)
    assert y.dtype == torch.float32
    # The reference casts q/k (prefix included) to the RoPE dtype and back.
    assert torch.equal(y[..., :1, :], x[..., :1, :].bfloat16().float())
