"""KoLeo: the reference tensor, lightly's implementation and the grouped distributed form."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from geodino.testing import assert_close_rel

from geodino.losses import KoLeoLoss, KoLeoLossDistributed, koleo_loss, koleo_loss_distributed


def test_matches_reference(load_ref):
    ref = load_ref("loss_koleo")
    assert_close_rel(koleo_loss(ref["x"]), ref["loss"])
    assert_close_rel(KoLeoLoss()(ref["x"]), ref["loss"])


def _lightly_koleo_module():
    """lightly/loss/koleo_loss.py on its own: importing the lightly.loss package costs ~4 s."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lightly is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss" / "koleo_loss.py"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    module_spec = importlib.util.spec_from_file_location("_lightly_koleo_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_matches_lightly(load_ref):
    lightly_koleo = _lightly_koleo_module()
    x = load_ref("loss_koleo")["x"]
    assert_close_rel(koleo_loss(x), lightly_koleo.KoLeoLoss()(x))


def test_definition_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g)
    xn = F.normalize(x, dim=-1)
    dots = xn @ xn.t() - 3 * torch.eye(10)
    nn_idx = dots.argmax(1)
    dist = ((xn - xn[nn_idx] + 1e-8) ** 2).sum(-1).sqrt()  # PairwiseDistance adds eps to the difference
    assert_close_rel(koleo_loss(x), -(dist + 1e-8).log().mean())


@pytest.mark.parametrize("group_size", [None, 16])
def test_distributed_form_reduces_to_koleo_when_one_group(load_ref, group_size):
    x = load_ref("loss_koleo")["x"]
    assert x.shape[0] == 16
    assert_close_rel(koleo_loss_distributed(x, group_size=group_size), koleo_loss(x))
    assert_close_rel(KoLeoLossDistributed(loss_group_size=group_size)(x), koleo_loss(x))


def test_groups_of_consecutive_samples(load_ref):
    x = load_ref("loss_koleo")["x"]
    grouped = koleo_loss_distributed(x, group_size=8)
    assert_close_rel(grouped, (koleo_loss(x[:8]) + koleo_loss(x[8:])) / 2)


def test_topk():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g)
    xn = F.normalize(x, dim=-1)
    dots = xn @ xn.t() - 3 * torch.eye(8)
    idx = dots.topk(2, dim=1).indices
    dist = (xn.unsqueeze(1) - xn[idx] + 1e-8).norm(dim=-1)
    assert_close_rel(koleo_loss_distributed(x, group_size=None, topk=2), -(dist + 1e-8).log().mean())


def test_gradients_and_dtypes(load_ref):
    x = load_ref("loss_koleo")["x"].clone().requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    xb = x.detach().bfloat16()
    out = koleo_loss(xb)
    assert out.dtype == torch.float32
    assert_close_rel(out, koleo_loss(xb.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close_rel(koleo_loss(x.detach()), koleo_loss(x.detach()), what="autocast disabled inside")
        assert koleo_loss(x.detach()).dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="divide"):
        koleo_loss_distributed(torch.randn(12, 4), group_size=8)
    with pytest.raises(ValueError, match="topk"):
        koleo_loss_distributed(torch.randn(8, 4), group_size=4, topk=4)
