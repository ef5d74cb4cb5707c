"""Feeding the trainer (issue "Feed the accelerator"): multi-crop on the training device draws the same crops as in
the loader workers, loader defaults from the machine, the data-wait warning, and the chip store's fast read."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from geodino import cli
from geodino.data.multicrop import MultiCropAugmentation
from geodino.runtime import loader_workers
from geodino.train import loop
from geodino.train.monitors import DataWaitMonitor

TINY = ["train.batch_size=4", "train.iterations=3", "stage.crops.global_crops_size=32", "stage.crops.local_crops_size=16",
        "stage.crops.local_crops_number=2", "data.chip_size=48", "stage.dino.head_n_prototypes=32",
        "stage.dino.head_hidden_dim=32", "stage.dino.head_bottleneck_dim=16", "stage.ibot.head_n_prototypes=32",
        "stage.ibot.head_hidden_dim=32", "stage.ibot.head_bottleneck_dim=16", "train.pca_png=false", "progress=false",
        "train.monitor_every=0", "train.checkpoint_every=0"]


class _Images(torch.utils.data.Dataset):
    def __init__(self, n_bands=5):
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(n_bands, 40, 40, generator=g) for _ in range(6)]

    def __getitem__(self, i):
        return self.images[int(i) % len(self.images)]


def _augment(n_bands=5):
    return MultiCropAugmentation(32, 16, 3, mean=[0.5] * n_bands, std=[0.2] * n_bands, n_bands=n_bands,
                                 rgb_indices=(2, 1, 0))


def test_augment_on_the_device_draws_the_crops_the_workers_draw():
    source, aug = _Images(), _augment()
    samples = lambda samples, rng: samples  # noqa: E731  (the collate is not under test)
    workers, collate_w = loop.augmented_data(source, aug, 7, samples, "cpu")
    device, collate_d = loop.augmented_data(source, aug, 7, samples, "gpu", "cpu")
    assert isinstance(workers, loop.AugmentedDataset) and isinstance(device, loop.IndexedImages)
    indices = [0, 5, 11]
    a = collate_w([workers[i] for i in indices], None)
    b = collate_d([device[i] for i in indices], None)
    for x, y in zip(a, b):
        for key in ("global_crops", "local_crops"):
            assert len(x[key]) == len(y[key]) > 0
            for cx, cy in zip(x[key], y[key]):
                assert torch.equal(cx, cy)
    other = collate_d([device[i] for i in (1, 2, 3)], None)
    assert not torch.equal(other[0]["global_crops"][0], b[0]["global_crops"][0])
    with pytest.raises(Exception, match="augment_on"):
        loop.augmented_data(source, aug, 7, samples, "tpu")


def test_a_run_augmenting_on_the_device_trains_like_one_augmenting_in_workers(tmp_path):
    runs = {}
    for on in ("cpu", "gpu"):
        run = tmp_path / on
        assert cli.main(["train", f"run_dir={run}", f"data.augment_on={on}", *TINY]) == 0
        runs[on] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in runs["cpu"][0] if k.startswith("loss")]
    assert len(keys) >= 4 and len(runs["cpu"]) == len(runs["gpu"]) == 3
    for a, b in zip(runs["cpu"], runs["gpu"]):
        assert [a[k] for k in keys] == [b[k] for k in keys]


def test_highres_refuses_augment_on_gpu(tmp_path):
    assert cli.main(["train", "stage=highres", "data.augment_on=gpu", f"run_dir={tmp_path / 'r'}", *TINY]) != 0


def test_loader_workers_come_from_the_machine(monkeypatch):
    from geodino import runtime

    assert loader_workers(3, "cpu") == 3 and loader_workers("0", "cuda") == 0
    for cpus, gpu, cpu in ((2, 1, 0), (16, 8, 4), (64, 8, 4), (8, 7, 2)):
        monkeypatch.setattr(runtime, "usable_cpus", lambda cpus=cpus: cpus)
        assert loader_workers("auto", "cuda") == gpu and loader_workers("auto", "cpu") == cpu
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 32)
    assert loader_workers("auto", "cuda", processes_per_node=4) == 7  # 8 cores each, one for the loop


def _rows(data, step, n):
    return [{"time_data": data, "time_step": step} for _ in range(n)]


def test_the_data_wait_warning_fires_once_and_names_the_remedies(caplog):
    mon = DataWaitMonitor(0.5, num_workers=2, device="cpu", cpus=2, window=5, skip=2)
    assert mon.active
    with caplog.at_level(logging.WARNING, logger="geodino"):
        for step, row in enumerate(_rows(0.1, 1.0, 6) + _rows(0.8, 1.0, 20)):
            mon(step, row)
    msgs = [r.getMessage() for r in caplog.records if "waited on data" in r.getMessage()]
    assert len(msgs) == 1
    assert "train.num_workers (now 2" in msgs[0] and "data=chips" in msgs[0] and "data.augment_on=gpu" in msgs[0]
    assert mon.summary()["data_wait_share"] == pytest.approx(0.8) and mon.summary()["warned"] is True


def test_the_data_wait_warning_stays_silent_below_the_share_and_on_a_cpu_without_workers(caplog):
    quiet = DataWaitMonitor(0.5, num_workers=2, device="cpu", cpus=2, window=5, skip=0)
    inline = DataWaitMonitor(0.5, num_workers=0, device="cpu", cpus=2, window=5, skip=0)
    off = DataWaitMonitor(0.0, num_workers=4, device="cpu", cpus=8, window=5, skip=0)
    assert not inline.active and not off.active
    with caplog.at_level(logging.WARNING, logger="geodino"):
        for step, row in enumerate(_rows(0.4, 1.0, 30)):
            quiet(step, row)
        for step, row in enumerate(_rows(0.9, 1.0, 30)):
            inline(step, row)
            off(step, row)
    assert not [r for r in caplog.records if "waited on data" in r.getMessage()]
    assert quiet.summary()["warned"] is False and inline.summary() == {}


def test_multispectral_brightness_contrast_is_one_pass_of_either_order():
    from geodino.data import multicrop

    g = torch.Generator().manual_seed(3)
    img = torch.rand(6, 20, 20, generator=g) * 1.4
    out = multicrop._ms_brightness_contrast(img, 0.4, 0.4, True, torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(1)
    b = (0.6 + 0.8 * torch.rand(6, generator=draws)).view(6, 1, 1)
    c = (0.6 + 0.8 * torch.rand(6, generator=draws)).view(6, 1, 1)
    m = img.mean(dim=(-2, -1), keepdim=True)
    brightness_first = (img * b - m * b) * c + m * b
    contrast_first = ((img - m) * c + m) * b
    torch.testing.assert_close(out, brightness_first, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, contrast_first, rtol=1e-6, atol=1e-6)
    assert out.amax() > 1.0  # never clipped
