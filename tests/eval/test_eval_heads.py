"""Dense heads on intermediate layers: the DPT head (smp's decoder), linear on concatenated layers, `task.layers`."""

from __future__ import annotations

import pytest
import torch
from fakes.eval_fakes import eval_argv, read_results

from geodino import cli
from geodino.errors import GeodinoError
from geodino.eval.probes import DPTHead, LinearSegHead, UperNetHead, build_dense_head
from geodino.models import load_backbone
from geodino.models.extract import Extractor

CPU = torch.device("cpu")


@pytest.mark.parametrize("name,layers,in_chans,dims,grid", [
    ("geodino_vit_tiny", 2, 3, [96, 96], (4, 5)),
    ("geodino_vit_tiny", [0], 5, [96], (4, 5)),                       # a 5-band ViT, one intermediate block
    ("geodino_convnext_tiny", 4, 3, [24, 48, 96, 96], (4, 5)),        # stages of stride 4..32 on the 16-px grid
    ("geodino_convnext_tiny", [1, 3], 4, [48, 96], (4, 5)),
])
def test_layers_concatenate_on_the_patch_grid_and_dpt_splits_them(name, layers, in_chans, dims, grid):
    torch.manual_seed(0)
    kw = {} if in_chans == 3 else {"in_chans": in_chans}
    ext = Extractor(load_backbone(name, **kw), CPU, layers=layers)
    cls, g = ext(torch.rand(2, in_chans, 64, 80))
    assert ext.layer_dims == dims and g.shape == (2, sum(dims), *grid) and cls.shape == (2, sum(dims))
    head = build_dense_head("dpt", g.shape[1], 7, hidden=16, layer_dims=ext.layer_dims)
    assert isinstance(head, DPTHead)
    assert head(g.clone()).shape == (2, 7, 8 * grid[0], 8 * grid[1])  # DPT: 1/2 of the 16-px input grid
    up = build_dense_head("upernet", g.shape[1], 7, hidden=16, layer_dims=ext.layer_dims)
    assert isinstance(up, UperNetHead) and up(g.clone()).shape == (2, 7, 4 * grid[0], 4 * grid[1])
    lin = build_dense_head("linear", g.shape[1], 7)
    assert isinstance(lin, LinearSegHead) and lin(g.clone()).shape == (2, 7, *grid)


def test_dpt_pads_odd_grids_and_checks_the_width():
    head = DPTHead([8, 8, 8, 8, 8], 3, hidden=8)  # five layers: the grid must divide by 4
    assert head(torch.rand(1, 40, 5, 7)).shape == (1, 3, 40, 56)
    with pytest.raises(GeodinoError, match="got features with 24 channels"):
        head(torch.rand(1, 24, 4, 4))
    with pytest.raises(GeodinoError, match="do not add up"):
        build_dense_head("dpt", 10, 3, layer_dims=[4, 4])


def test_bad_layer_indices_are_one_clear_error():
    vit = load_backbone("geodino_vit_tiny")
    with pytest.raises(GeodinoError, match=r"block indices \[5\] out of range .* 2 blocks"):
        Extractor(vit, CPU, layers=[0, 5])
    with pytest.raises(GeodinoError, match="names a block twice"):
        Extractor(vit, CPU, layers=[1, 1])
    with pytest.raises(GeodinoError, match="out of range"):
        Extractor(vit, CPU, layers=3)


def test_dpt_head_overfits_a_tiny_fake_loveda(loveda_root, tmp_path):
    """The head and loss path: a DPT (and an UperNet) on two layers of the tiny ViT memorises 4 training tiles whose
    8-px class blocks are finer than its 16-px tokens; the linear head on the same features cannot resolve them."""
    argv = eval_argv("loveda", loveda_root, tmp_path, "task.window=32", "task.stride=32", "task.eval_split=train",
                     "task.head=[dpt,upernet,linear]", "task.layers=2", "task.epochs=60", "task.lr=3e-3", "task.batch_size=4",
                     "task.decoder_dim=32", "n_figures=0")
    assert cli.main(argv) == 0
    r = read_results(tmp_path / "run")
    assert r["heads"]["dpt"]["miou"] >= 95.0
    assert r["heads"]["upernet"]["miou"] >= 90.0
    assert r["heads"]["linear"]["miou"] < 60.0
    assert r["protocol"]["heads"] == ["dpt", "upernet", "linear"]
