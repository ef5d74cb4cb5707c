"""Gram anchoring and high-resolution adaptation: refresh schedule, resolution draw, stage chaining."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from geodino import cli
from geodino.models import build_backbone
from geodino.train.gram import GramMetaArch, MultiResolutionDataset, copy_backbone
from geodino.train.monitors import gram_agreement

from test_pretrain import TINY


def _meta(**gram):
    over = [f"stage.gram.{k}={v}" for k, v in gram.items()]
    cfg = cli.compose("train", ["stage=gram", *TINY, *over])
    bb = build_backbone("geodino_vit_tiny", in_chans=13)
    return GramMetaArch(bb, cfg.stage, copy_backbone(bb))


def test_gram_teacher_refresh_schedule():
    meta = _meta(it_first_update=4, update_frequency=2, max_updates=2, rep_update=True)
    refreshed = []
    for step in range(12):
        with torch.no_grad():  # make the EMA teacher differ from the Gram teacher
            meta.teacher.backbone.norm.weight.add_(1.0)
        before = meta.gram_teacher.norm.weight.clone()
        meta.after_step(step)
        if not torch.equal(before, meta.gram_teacher.norm.weight):
            refreshed.append(step + 1)
            assert torch.equal(meta.gram_teacher.norm.weight, meta.teacher.backbone.norm.weight)
    # (it+1) >= 4 and (it+1) % 2 == 0, at most 2 times -> after iterations 4 and 6, then frozen
    assert refreshed == [4, 6]
    assert int(meta.gram_updates) == 2
    assert "gram_updates" in meta.state_dict()  # resumes keep the count
    assert not any(p.requires_grad for p in meta.gram_teacher.parameters())
    meta.train()
    assert not meta.gram_teacher.training and meta.student.training


def test_no_refresh_when_rep_update_is_off():
    meta = _meta(rep_update=False, it_first_update=1, update_frequency=1)
    with torch.no_grad():
        meta.teacher.backbone.norm.weight.add_(1.0)
    meta.after_step(0)
    assert int(meta.gram_updates) == 0
    assert not torch.equal(meta.gram_teacher.norm.weight, meta.teacher.backbone.norm.weight)


def test_resolution_draw_follows_probabilities_and_is_per_batch():
    class Aug:
        def __init__(self, k):
            self.k = k

        def __call__(self, img, generator=None):
            return {"global_crops": [torch.full((1, 1, 1), float(self.k))], "local_crops": []}

    ds = MultiResolutionDataset([torch.zeros(1)] * 10**6, [Aug(k) for k in range(3)], [0.6, 0.3, 0.1],
                                samples_per_batch=4, seed=0)
    draws = [ds.setting_for_batch(b) for b in range(5000)]
    freq = Counter(draws)
    assert abs(freq[0] / 5000 - 0.6) < 0.03 and abs(freq[1] / 5000 - 0.3) < 0.03 and abs(freq[2] / 5000 - 0.1) < 0.02
    for b in range(50):  # every sample of a global batch shares the batch's setting
        settings = {ds[b * 4 + j]["crop_setting"] for j in range(4)}
        assert settings == {ds.setting_for_batch(b)}
    again = MultiResolutionDataset([torch.zeros(1)] * 10, [Aug(k) for k in range(3)], [0.6, 0.3, 0.1], 4, seed=0)
    assert [again.setting_for_batch(b) for b in range(100)] == draws[:100]
    with pytest.raises(ValueError, match="probabilities"):
        MultiResolutionDataset([], [Aug(0)], [0.5, 0.5], 4)


def test_gram_agreement_is_one_for_identical_features_and_lower_otherwise():
    x = torch.randn(2, 16, 8)
    assert gram_agreement(x, x) == pytest.approx(1.0, abs=1e-6)
    assert gram_agreement(x, torch.randn(2, 16, 8)) < 0.5


@pytest.mark.slow
def test_stages_chain_from_the_cli(tmp_path):
    common = [*TINY, "train.iterations=2", "train.checkpoint_every=2"]
    assert cli.main(["train", f"run_dir={tmp_path / 'pre'}", "model.drop_path_rate=0.2", *common]) == 0
    assert cli.main(["train", "stage=gram", f"init={tmp_path / 'pre'}", f"run_dir={tmp_path / 'gram'}",
                     "stage.gram.it_first_update=1", "stage.gram.update_frequency=1", *common]) == 0
    assert cli.main(["train", "stage=highres", f"init={tmp_path / 'gram'}", f"run_dir={tmp_path / 'hr'}",
                     "train.drop_path_rate=0.1", *common]) == 0
    # the student's stochastic depth: the model's, then inherited from the predecessor, unless train. sets it;
    # the value used is in the config snapshot
    from omegaconf import OmegaConf

    rates = [OmegaConf.load(tmp_path / run / "config.yaml").train.drop_path_rate for run in ("pre", "gram", "hr")]
    assert rates == [0.2, 0.2, 0.1]
    rows = [json.loads(line) for line in (tmp_path / "hr" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["global_crops_size"] in (64, 96) and r["gram_crops_size"] in (96, 144)
        assert r["loss_gram"] >= 0 and 0 < r["gram_agreement"] <= 1
    gram_rows = [json.loads(line) for line in (tmp_path / "gram" / "metrics.jsonl").read_text().splitlines()]
    assert gram_rows[-1]["gram_updates"] == 2
    ckpt = torch.load(tmp_path / "hr" / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert ckpt["stage"] == "highres" and ckpt["init"] == str(tmp_path / "gram")
    assert any(k.startswith("gram_teacher.") for k in ckpt["models"]["meta_arch"])
    from geodino.models import load_backbone

    assert load_backbone(tmp_path / "hr").geodino_contract.in_chans == 13


def test_wrong_or_missing_predecessor_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "stage=gram", f"run_dir={tmp_path}/g", *TINY]) == 2
    assert "pass init=" in capsys.readouterr().err
    assert cli.main(["train", "stage=highres", f"init={tmp_path}/nothing", f"run_dir={tmp_path}/h", *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_gram_continues_a_released_backbone_with_head_warmup(tmp_path):
    """init=<official .pth>: RGB weights adapted to 13 bands, fresh heads warmed up on a frozen backbone,
    the released backbone as Gram teacher."""
    from geodino.models import load_backbone

    torch.manual_seed(1)
    official = tmp_path / "released_vit_tiny.pth"
    torch.save(build_backbone("geodino_vit_tiny").state_dict(), official)  # official keys, 3 bands
    run = tmp_path / "gram"
    assert cli.main(["train", "stage=gram", f"init={official}", "model=vit_tiny", f"run_dir={run}",
                     "stage.head_warmup_iterations=2", "train.iterations=2", "train.checkpoint_every=2", *TINY]) == 0
    ckpt = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert ckpt["contract"]["band_adaptation"]["rgb_indices"] == [3, 2, 1]
    start = load_backbone("geodino_vit_tiny", weights=official, in_chans=13,
                          bands=ckpt["contract"]["bands"]).state_dict()
    state = ckpt["models"]["meta_arch"]
    for k, v in start.items():  # warm-up: the backbone has not moved, the heads have
        assert torch.equal(state[f"student.backbone.{k}"], v), k
        assert torch.equal(state[f"gram_teacher.{k}"], v), k
    # the fresh heads trained (the EMA teacher's copy lags behind the student's)
    assert not torch.equal(state["student.dino_head.mlp.0.weight"], state["teacher.dino_head.mlp.0.weight"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_gram"] >= 0 for r in rows)
    assert cli.main(["train", "stage=gram", "init=dinov3_vits16", f"run_dir={tmp_path / 'x'}", *TINY]) == 2


def test_heldout_monitor_reports_dense_quality_and_restores_train_mode():
    from geodino.train.monitors import heldout_monitor

    meta = _meta()
    meta.train()
    x = torch.randn(4, 13, 32, 32)
    stats = heldout_monitor(meta, x, gram_size=64)
    assert set(stats) >= {"heldout_cls_std", "heldout_patch_erank", "heldout_gram_agreement"}
    # the Gram teacher starts as a copy of the student: identical similarity structure up to the resize
    assert 0.5 < stats["heldout_gram_agreement"] <= 1.0
    assert meta.student.training and not meta.gram_teacher.training


@pytest.mark.parametrize("stage,w_local", [("pretrain", 1.0), ("gram", 0.5), ("highres", 0.5)])
def test_total_loss_uses_the_reference_weights(stage, w_local):
    from geodino.data.collate import collate_data_and_cast
    from geodino.data.masking import MaskingGenerator
    from geodino.train.ssl import SSLMetaArch

    cfg = cli.compose("train", [f"stage={stage}", *TINY])
    assert cfg.stage.dino.local_loss_weight == w_local
    torch.manual_seed(0)
    meta = SSLMetaArch(build_backbone("geodino_vit_tiny", in_chans=3, layerscale_init=1.0), cfg.stage).train()
    samples = [{"global_crops": [torch.randn(3, 32, 32) for _ in range(2)],
                "local_crops": [torch.randn(3, 16, 16) for _ in range(2)]} for _ in range(4)]
    batch = collate_data_and_cast(samples, n_tokens=4, mask_generator=MaskingGenerator((2, 2), rng=0), random_state=0)
    _, st = meta.forward_backward(batch, 0.07)
    # n_g = 2 global, n_l = 2 local crops: local terms 4, global terms 2 (spec §3.5)
    expected = (4 / 6 * w_local * st["loss_dino_local"] + 2 / 6 * st["loss_dino_global"]
                + 0.1 * 2 * st["loss_koleo"] + st.get("loss_ibot", 0.0))
    assert st["loss"] == pytest.approx(expected, rel=1e-5)
