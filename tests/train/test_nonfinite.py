"""Issue #14 item 3: the augmentation cannot produce NaN, the monitors never raise on non-finite input, and a
diverging run ends in the trainer's one-line "training diverged" error."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from geodino import cli
from geodino.data.multicrop import MultiCropAugmentation
from geodino.data.sources.folder import read_photo
from geodino.testing import cli_error_lines
from geodino.train.monitors import collapse_monitor, heldout_monitor

SMALL = ["model=vit_tiny", "data=sample_nat", "train.batch_size=2", "stage.crops.global_crops_size=32",
         "stage.crops.local_crops_size=16", "stage.crops.local_crops_number=2", "stage.dino.head_n_prototypes=64",
         "stage.dino.head_hidden_dim=32", "stage.dino.head_bottleneck_dim=16", "stage.ibot.head_n_prototypes=64",
         "stage.ibot.head_hidden_dim=32", "stage.ibot.head_bottleneck_dim=16", "train.pca_png=false",
         "progress=false", "train.monitor_every=2", "train.monitor_images=2", "train.checkpoint_every=0"]


def _packaged_photos() -> list[torch.Tensor]:
    from importlib import resources

    folder = resources.files("geodino.data.sample") / "nat"
    return [read_photo(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".jpg")]


def test_multicrop_of_the_packaged_photos_has_no_nan_and_stays_in_range():
    photos = _packaged_photos()
    aug = MultiCropAugmentation(global_crops_size=64, local_crops_size=32, local_crops_number=4,
                                gram_teacher_crops_size=96, gram_teacher_no_distortions=True)
    mean, std = torch.tensor(aug.mean).view(3, 1, 1), torch.tensor(aug.std).view(3, 1, 1)
    n_nan = n_crops = 0
    for i in range(200):
        out = aug(photos[i % len(photos)], generator=torch.Generator().manual_seed(i))
        for crop in out["global_crops"] + out["local_crops"] + out["gram_teacher_crops"]:
            n_crops += 1
            n_nan += int(torch.isnan(crop).any())
            x01 = crop * std + mean  # back to pixel values: the [0, 1] of a uint8 image
            assert x01.min() > -1e-4 and x01.max() < 1 + 1e-4
    assert n_crops == 200 * 8 and n_nan == 0


def test_multispectral_resampling_never_goes_below_zero_but_keeps_values_above_one():
    img = torch.zeros(4, 64, 64)
    img[:, :, 32:] = 1.6  # a sharp edge: bicubic overshoots on both sides
    aug = MultiCropAugmentation(global_crops_size=48, local_crops_size=16, local_crops_number=0, n_bands=4,
                                mean=[0.0] * 4, std=[1.0] * 4, color_jitter_prob=0, grayscale_prob=0,
                                solarize_prob=0, blur_probs=(0, 0, 0), horizontal_flips=False)
    lo, hi = math.inf, -math.inf
    for i in range(20):
        for crop in aug(img, generator=torch.Generator().manual_seed(i))["global_crops"]:
            lo, hi = min(lo, float(crop.min())), max(hi, float(crop.max()))
    assert lo >= 0.0 and hi > 1.5  # the floor is clamped, reflectance above 1 is not


def test_collapse_and_heldout_monitors_return_nan_on_non_finite_input():
    cls = torch.randn(4, 16)
    patches = torch.randn(4, 9, 16)
    assert all(math.isfinite(v) for v in collapse_monitor(cls, patches).values())
    bad = patches.clone()
    bad[1, 3, 5] = float("nan")
    stats = collapse_monitor(cls, bad)
    assert math.isnan(stats["patch_erank"])
    stats = collapse_monitor(torch.full((4, 16), float("inf")), torch.full((4, 9, 16), float("inf")))
    assert set(stats) == {"cls_std", "cls_std_x_sqrt_dim", "patch_erank"}
    assert all(math.isnan(v) for v in stats.values())

    from geodino.models import build_backbone

    class Meta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = torch.nn.ModuleDict({"backbone": build_backbone("geodino_vit_tiny")})

    images = torch.full((2, 3, 32, 32), float("nan"))
    stats = heldout_monitor(Meta(), images)
    assert np.isnan([stats["heldout_patch_erank"], stats["heldout_cls_std"]]).all()


def test_sample_nat_trains_and_an_infinite_lr_ends_in_one_error_line(tmp_path, capsys):
    run = tmp_path / "ok"
    assert cli.main(["train", f"run_dir={run}", "train.iterations=4", *SMALL]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["patch_erank"] is not None for r in rows)
    capsys.readouterr()

    # a learning rate that blows the weights up: NaN features reach the monitors, the trainer's guard ends the run
    rc = cli.main(["train", f"run_dir={tmp_path / 'huge'}", "train.iterations=8", "optim.lr=1e30",
                   "optim.warmup_iterations=0", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = cli_error_lines(err)  # everything but geodino's own log lines: no traceback, no numpy warning
    assert len(lines) == 1 and lines[0].startswith("error: geodino train: training diverged"), err

    # optim.lr=inf: one line too (the config schema refuses it, or the trainer's guard ends the run)
    rc = cli.main(["train", f"run_dir={tmp_path / 'inf'}", "train.iterations=8", "optim.lr=inf",
                   "optim.warmup_iterations=0", *SMALL])
    err = capsys.readouterr().err
    lines = cli_error_lines(err)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: geodino train: "), err
    assert "optim.lr" in lines[0] or "training diverged" in lines[0]
