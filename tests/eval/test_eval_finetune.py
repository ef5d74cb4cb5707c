"""Training on images: joint augmentation, fine-tuning (full / LoRA) with layer-wise LR decay, head checkpoints
applied to rasters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes.eval_fakes import eval_argv, read_results

from geodino import cli
from geodino.errors import GeodinoError
from geodino.eval.datasets.loveda import CLASS_NAMES, LoveDATiles
from geodino.eval.finetune import (WindowDataset, build_augment, build_net, load_dense_checkpoint,
                                   optimizer_groups, prepare_backbone, save_dense_checkpoint, train_on_images)
from geodino.models import load_backbone

pytest.importorskip("peft", reason="LoRA fine-tuning needs peft")


def _coded(size=32, block=8, seed=0):
    """An image whose band 0 encodes the mask (value / 10) so any misalignment after augmentation shows."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 8, size=(size // block, size // block))
    mask = torch.from_numpy(np.kron(blocks, np.ones((block, block), dtype=np.int64)))
    img = torch.stack([mask.float() / 10, torch.rand(size, size), torch.rand(size, size)])
    return img, mask


class _Tiles:
    def __init__(self, n=3, size=32):
        self.samples = [_coded(size, seed=i) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def size(self, i):
        return tuple(self.samples[i][1].shape)

    def load(self, i):
        img, mask = self.samples[i]
        return {"image": img, "target": mask, "name": str(i), "group": ""}


@pytest.mark.parametrize("names", [["hflip"], ["vflip"], ["rot90"], ["hflip", "vflip", "rot90", "brightness"]])
def test_joint_augmentation_keeps_image_and_mask_aligned_exactly(names):
    torch.manual_seed(0)
    ds = WindowDataset(_Tiles(), 32, 32, "seg", build_augment(names, 32))
    changed = 0
    for k in range(len(ds)):
        for _ in range(4):
            img, mask, valid = ds[k]
            assert img.shape == (3, 32, 32) and mask.shape == (32, 32) and valid.all()
            if "brightness" not in names:
                assert torch.equal((img[0] * 10).round().long(), mask)
            changed += int(not torch.equal(mask, ds.tiles.load(k)["target"]))
    assert changed > 0  # the augmentation did something


def test_resized_crop_moves_mask_with_the_image():
    torch.manual_seed(0)
    ds = WindowDataset(_Tiles(), 32, 32, "seg", build_augment(["resized_crop"], 32, (0.3, 0.6)))
    img, mask, _ = ds[0]
    agree = ((img[0] * 10).round().long() == mask).float().mean()
    assert img.shape == (3, 32, 32) and agree > 0.85  # bilinear image vs nearest mask differ only at block edges
    assert mask.dtype == torch.long and set(mask.unique().tolist()) <= set(range(8))
    with pytest.raises(GeodinoError, match="unknown augmentation 'blur'"):
        build_augment(["blur"], 32)


def test_lora_trains_only_adapters_and_head_and_the_checkpoint_reproduces_it(tmp_path):
    torch.manual_seed(0)
    backbone = load_backbone("geodino_vit_tiny")
    base = {k: v.clone() for k, v in backbone.state_dict().items()}
    prepare_backbone(backbone, "lora", r=4, alpha=8)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == {f"blocks.{i}.attn.{m}" for i in (0, 1) for m in ("qkv", "proj")}
    net = build_net(backbone, "linear", 8, "seg", 2, 32, allowed=list(range(8)))
    head0 = {k: v.clone() for k, v in net.model.state_dict().items()}
    lora0 = {n: p.detach().clone() for n, p in backbone.named_parameters() if "lora_" in n}
    train_on_images(net, WindowDataset(_Tiles(), 32, 32, "seg", build_augment(["hflip"], 32)), epochs=3, lr=1e-2,
                    batch_size=3)
    after = backbone.state_dict()
    for k, v in base.items():  # every base weight bitwise unchanged (peft keeps them under .base_layer)
        k2 = k if k in after else k.replace(".qkv.", ".qkv.base_layer.").replace(".proj.", ".proj.base_layer.")
        assert torch.equal(after[k2], v), k
    assert any(not torch.equal(lora0[n], p) for n, p in backbone.named_parameters() if "lora_B" in n)
    assert any(not torch.equal(head0[k], v) for k, v in net.model.state_dict().items() if v.is_floating_point())

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = net.logits(x)
    path = save_dense_checkpoint(tmp_path / "h.pt", net, head_kind="linear", hidden=128, window=32,
                                 class_names=CLASS_NAMES, ignore_index=0, finetune="lora", task="loveda")
    loaded, rec = load_dense_checkpoint(path)
    assert rec["finetune"] == "lora" and rec["class_names"] == list(CLASS_NAMES) and rec["layers"] == 2
    assert not any("lora" in k for k in loaded.backbone.state_dict())  # merged: a plain backbone
    with torch.no_grad():
        assert torch.allclose(loaded.logits(x), ref, atol=1e-4)
    assert load_backbone(str(path)).geodino_contract.name == "geodino_vit_tiny"  # readable as a backbone file


def test_full_finetune_changes_the_backbone_and_frozen_does_not():
    for mode, changes in (("full", True), ("none", False)):
        torch.manual_seed(0)
        backbone = load_backbone("geodino_vit_tiny")
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        prepare_backbone(backbone, mode)
        net = build_net(backbone, "linear", 8, "seg", 1, 32)
        train_on_images(net, WindowDataset(_Tiles(), 32, 32, "seg"), epochs=2, lr=1e-3, batch_size=3)
        moved = any(not torch.equal(before[k], v) for k, v in backbone.state_dict().items())
        assert moved is changes, mode


def test_layer_wise_lr_decay_scales_backbone_groups():
    backbone = prepare_backbone(load_backbone("geodino_vit_tiny"), "full")
    net = build_net(backbone, "linear", 3, "seg", 1, 32)
    groups = optimizer_groups(net, lr=1.0, weight_decay=0.1, layer_decay=0.5, backbone_lr_mult=0.1)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr_of["head.conv.weight"] == 1.0
    assert lr_of["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(0.1 * 0.5)      # L+1-id = 3-2
    assert lr_of["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.1 * 0.25)
    assert lr_of["backbone.patch_embed.proj.weight"] == pytest.approx(0.1 * 0.125)
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd_of["backbone.blocks.0.attn.qkv.bias"] == 0.0 and wd_of["head.conv.weight"] == pytest.approx(0.1)


def test_loveda_lora_with_augmentation_from_the_cli_then_segment_a_raster(loveda_root, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    argv = eval_argv("loveda", loveda_root, tmp_path, "task.window=32", "task.stride=32", "task.epochs=2",
                     "task.batch_size=4", "task.finetune=lora", "task.augment=[hflip,rot90]", "task.layer_decay=0.9",
                     "save_heads=true", "n_figures=0")
    assert cli.main(argv) == 0
    r = read_results(tmp_path / "run")
    assert r["finetune"] == "lora" and r["augment"] == ["hflip", "rot90"] and r["trained_on"] == "images"
    ckpt = tmp_path / "run" / "heads" / "linear.pt"
    assert r["checkpoints"]["linear"] == str(ckpt) and ckpt.is_file()
    assert not (tmp_path / "run" / "_scratch_features").exists()  # fine-tuned features are not kept

    # a new raster with a CRS: geodino segment applies the head, tiled, and keeps the georeference
    img = LoveDATiles(loveda_root, "val", ["urban"]).load(0)["image"]
    big = (np.tile(img.numpy(), (1, 2, 2)) * 255).astype(np.uint8)  # 64x64
    src = tmp_path / "scene.tif"
    prof = dict(driver="GTiff", height=64, width=64, count=3, dtype="uint8", crs="EPSG:32631",
                transform=from_origin(500000, 4000000, 0.3, 0.3))
    with rasterio.open(src, "w", **prof) as dst:
        dst.write(big)
    out = tmp_path / "scene_seg.tif"
    assert cli.main(["segment", f"checkpoint={ckpt}", f"input={src}", f"out={out}", "tile=32", "overlap=8",
                     "progress=false", "preview=false"]) == 0
    with rasterio.open(out) as o, rasterio.open(src) as i:
        assert o.crs == i.crs and o.transform == i.transform and (o.height, o.width) == (64, 64)
        labels = o.read(1)
        tags = o.tags()
    assert labels.min() >= 2 and labels.max() <= 8  # 1 would be LoveDA's no-data class, which never wins
    assert tags["CLASS_2"] == CLASS_NAMES[1]
    from geodino.segment.run import apply_head

    summary = apply_head(ckpt, src, tmp_path / "api.tif", tile=32, overlap=8, progress=False, preview=False)
    with rasterio.open(tmp_path / "api.tif") as o:
        assert np.array_equal(o.read(1), labels) and o.crs == prof["crs"]
    assert summary["classes"] == list(CLASS_NAMES)
