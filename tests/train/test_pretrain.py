"""The pretraining stage end to end on the packaged Sentinel-2 sample (tiny sizes): schedules,
parameter groups, EMA, one teacher pass per step, exact resume after a kill."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geodino import cli
from geodino.train import loop
from geodino.train.schedules import cosine_schedule, lr_scaled, teacher_temp_schedule

TINY = [
    "train.batch_size=4", "stage.crops.global_crops_size=32", "stage.crops.local_crops_size=16",
    "stage.crops.local_crops_number=2", "stage.dino.head_n_prototypes=256", "stage.dino.head_hidden_dim=64",
    "stage.dino.head_bottleneck_dim=32", "stage.ibot.head_n_prototypes=256", "stage.ibot.head_hidden_dim=64",
    "stage.ibot.head_bottleneck_dim=32", "data.chip_size=48", "train.pca_png=false", "progress=false",
    "optim.warmup_iterations=1", "ema.warmup_teacher_temp_iterations=2",
]


def _cfg(tmp_path, *extra):
    return cli.compose("train", [f"run_dir={tmp_path}", *TINY, *extra])


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def test_cosine_schedule_shape():
    s = cosine_schedule(1.0, 0.0, total=10, warmup=2)
    assert s[0] == 0.0 and s[1] == pytest.approx(0.5) and s[2] == pytest.approx(1.0)
    assert np.all(np.diff(s[2:]) <= 1e-12) and s[-1] > 0.0
    t = teacher_temp_schedule(0.04, 0.07, warmup=3, total=5)
    assert list(np.round(t, 3)) == [0.04, 0.055, 0.07, 0.07, 0.07]
    assert lr_scaled(1e-3, 1024, "sqrt_wrt_1024") == pytest.approx(4e-3)


def test_param_groups_follow_reference_rules():
    from geodino.models import build_backbone
    from geodino.models.heads import DINOHead

    bb = build_backbone("geodino_vit_tiny", in_chans=3)
    groups = loop.param_groups({"backbone": bb, "dino_head": DINOHead(96, 32, 16, 8)}, layerwise_decay=0.5,
                               patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    # depth 2: blocks.0 -> layer 1 -> 0.5^2, blocks.1 -> 0.5, norm -> 1, patch_embed -> 0.5^3 * 0.2
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(0.25)
    assert by_name["backbone.blocks.1.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.5)
    assert by_name["backbone.norm.weight"]["lr_mult"] == pytest.approx(1.0)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_mult"] == pytest.approx(0.125 * 0.2)
    assert by_name["backbone.cls_token"]["lr_mult"] == pytest.approx(0.125)
    # no weight decay on biases, norms and LayerScale; the tokens do decay
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.norm1.weight"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.ls1.gamma"]["wd_mult"] == 0.0
    assert by_name["backbone.cls_token"]["wd_mult"] == 1.0
    assert by_name["dino_head.last_layer.weight"]["is_last_layer"] is True
    assert by_name["dino_head.mlp.0.weight"]["lr_mult"] == 1.0


def test_ema_update_moves_teacher_towards_student():
    from geodino.models import build_backbone
    from geodino.train.ssl import SSLMetaArch

    cfg = cli.compose("train", TINY)
    meta = SSLMetaArch(build_backbone("geodino_vit_tiny", in_chans=13), cfg.stage)
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in meta.teacher.parameters()]
    meta.update_ema(0.9)
    for tb, t, s in zip(t_before, meta.teacher.parameters(), meta.student.parameters()):
        torch.testing.assert_close(t, 0.9 * tb + 0.1 * s)
    assert not any(p.requires_grad for p in meta.teacher.parameters())
    meta.train()
    assert meta.student.training and not meta.teacher.training


@pytest.mark.slow
def test_kill_and_resume_gives_identical_losses(tmp_path, monkeypatch):
    from geodino.train.run import run_train

    common = ["train.iterations=4", "train.checkpoint_every=2", "train.keep_last=5"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    run_train(_cfg(full_dir, *common))

    real_fit = loop.Trainer.fit

    def killed_fit(self, on_step=None):
        def kill(step, row):
            if step == 2:  # after the step-2 checkpoint, in the middle of the run
                raise KeyboardInterrupt
        return real_fit(self, on_step=kill)

    monkeypatch.setattr(loop.Trainer, "fit", killed_fit)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(resumed_dir, *common))
    monkeypatch.setattr(loop.Trainer, "fit", real_fit)
    assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["step_00000002.pt"]
    run_train(_cfg(resumed_dir, *common))

    full, resumed = _losses(full_dir), _losses(resumed_dir)
    assert sorted(resumed) == [0, 1, 2, 3]
    for step in range(4):
        for key in ("loss", "loss_dino_local", "loss_dino_global", "loss_koleo", "loss_ibot"):
            assert resumed[step][key] == full[step][key], (step, key)
    a = torch.load(full_dir / "checkpoints" / "step_00000004.pt", weights_only=False)["models"]["meta_arch"]
    b = torch.load(resumed_dir / "checkpoints" / "step_00000004.pt", weights_only=False)["models"]["meta_arch"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_one_teacher_forward_per_step_and_metrics(tmp_path, monkeypatch):
    from geodino.train import ssl
    from geodino.train.run import run_train

    calls = []
    real = ssl.SSLMetaArch.teacher_targets

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(ssl.SSLMetaArch, "teacher_targets", counting)
    run_train(_cfg(tmp_path, "train.iterations=3", "train.checkpoint_every=3"))
    assert len(calls) == 3
    rows = _losses(tmp_path)
    for r in rows.values():
        for key in ("loss", "loss_dino_local", "loss_dino_global", "loss_koleo", "loss_ibot", "lr", "teacher_temp",
                    "cls_std", "patch_erank", "time_data", "time_forward_backward", "time_optim"):
            assert key in r and math.isfinite(r[key]), key
    from geodino.checkpoint import Checkpoint

    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.path.name == "step_00000003.pt" and ckpt.stage == "pretrain" and ckpt.step == 3
    contract = ckpt.contract
    assert contract.bands[:4] == ["B01", "B02", "B03", "B04"] and contract.in_chans == 13
    assert len(contract.mean) == 13 and contract.patch_size == 16
    # the backbone loads back through the public API
    from geodino.models import load_backbone

    bb = load_backbone(tmp_path)
    assert bb.geodino_contract.bands == contract.bands
    out = bb.forward_features(torch.zeros(1, 13, 32, 32))
    assert out["x_norm_patchtokens"].shape == (1, 4, 96)


@pytest.mark.slow
def test_user_style_sat_config_trains_on_a_folder(tmp_path):
    """`data=sat data.paths=[<folder>]` as a user would write it, on a copy of the real sample."""
    import shutil

    from geodino.data.sample import sample_sat_path

    folder = tmp_path / "my_archive" / "2016"
    folder.mkdir(parents=True)
    shutil.copy(sample_sat_path(), folder / "S2_scene_a.tif")
    run = tmp_path / "run"
    assert cli.main(["train", "data=sat", f"data.paths=[{folder.parent}]", "data.chip_size=48",
                     "data.sensor=sentinel2", f"run_dir={run}", "train.iterations=2", *TINY]) == 0
    rows = _losses(run)
    assert sorted(rows) == [0, 1] and all(math.isfinite(r["loss"]) for r in rows.values())
    ckpt = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert ckpt["data"]["files"] == [str(folder / "S2_scene_a.tif")]
    assert ckpt["contract"]["bands"][-1] == "B12"


def test_softmax_centring_moves_its_centre_as_the_reference():
    """stage.centering=softmax: the teacher is centred with the running centre, which then starts its EMA update
    from the batch's teacher logits (momentum 0.9, applied at the next call) — before, the centre stayed 0."""
    from geodino.models import build_backbone
    from geodino.train.ssl import SSLMetaArch

    cfg = cli.compose("train", [*TINY, "stage.centering=softmax"])
    torch.manual_seed(0)
    meta = SSLMetaArch(build_backbone("geodino_vit_tiny", in_chans=13, layerscale_init=1.0), cfg.stage).train()
    crops = torch.randn(8, 13, 32, 32)  # the teacher is in eval mode: no RoPE jitter, the same logits twice
    idx = torch.tensor([0, 5, 9])
    logits = meta.teacher.dino_head(meta.teacher.backbone.forward_features(crops)["x_norm_clstoken"])
    meta.teacher_targets(crops, idx, torch.tensor([3]), teacher_temp=0.07)
    assert torch.count_nonzero(meta.dino_loss.center) == 0  # applied lazily, at the next step
    meta.teacher_targets(crops, idx, torch.tensor([3]), teacher_temp=0.07)
    torch.testing.assert_close(meta.dino_loss.center, 0.1 * logits.mean(0, keepdim=True), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(meta.ibot_patch_loss.center) > 0
