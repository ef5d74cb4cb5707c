"""DINOHead reproduces the official head output and key layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from geodino.testing import assert_close_rel, fp32_state_dict

from geodino.models import DINOHead


def test_reference_output_and_keys(load_ref):
    ref = load_ref("dino_head")
    head = DINOHead(**ref["kwargs"])
    result = head.load_state_dict(fp32_state_dict(ref["state_dict"]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(head.state_dict()) == list(ref["state_dict"])
    assert head.last_layer.bias is None
    with torch.no_grad():
        assert_close_rel(head(ref["x"]), ref["y"], what="dino head")
        z = head(ref["x"], no_last_layer=True)
        assert z.shape == (8, ref["kwargs"]["bottleneck_dim"])
        assert torch.allclose(z.norm(dim=-1), torch.ones(8), atol=1e-6)
        assert_close_rel(head(z, only_last_layer=True), ref["y"], what="only_last_layer")


def test_structure_and_init():
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=48, bottleneck_dim=16, nlayers=3)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert isinstance(head.mlp[1], torch.nn.GELU) and head.mlp[1].approximate == "none"
    # trunc_normal_(std=.02) with torch's default cut at +-2 (absolute), as the reference: effectively N(0, .02).
    for m in (head.mlp[0], head.mlp[2], head.mlp[4], head.last_layer):
        assert abs(m.weight.std().item() - 0.02) < 0.004
        assert m.bias is None or torch.all(m.bias == 0)
    x = torch.randn(5, 32)
    y = head(x)
    expected = head.last_layer(F.normalize(head.mlp(x), dim=-1, eps=1e-12))
    assert torch.equal(y, expected)
    assert list(DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4, nlayers=1).state_dict()) == [
        "mlp.weight",
        "mlp.bias",
        "last_layer.weight",
    ]
    assert "mlp.0.bias" not in DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4, mlp_bias=False).state_dict()


@pytest.mark.parametrize("rows", [3, 200])
def test_wide_prototype_layer_without_grad_equals_the_linear(rows):
    """The teacher's 16384+ prototype layer takes a re-blocked product (transposed, or chunked) outside
    autograd; values equal the plain Linear to rounding, and with gradients the Linear itself runs."""
    from geodino.models.heads import _prototype_logits

    torch.manual_seed(0)
    head = DINOHead(in_dim=32, out_dim=16384, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(rows, 32)
    with torch.no_grad():
        fast = head(x)
        plain = head.last_layer(head(x, no_last_layer=True))
    assert fast.is_contiguous()
    assert_close_rel(fast, plain, rtol=1e-6, what="no-grad prototype layer")
    z = torch.randn(rows, 16)
    torch.testing.assert_close(_prototype_logits(z, head.last_layer.weight, chunk=4096), z @ head.last_layer.weight.t())
    out = head(x)
    assert out.requires_grad
    out.sum().backward()
    assert head.last_layer.weight.grad is not None
