"""The paper protocols (configs/task/<task>_paper.yaml) run from one command on fake data in the real formats.

Only sizes are overridden (window / crop, decoder width, epochs) so the run takes seconds on a CPU; head, layers,
learning-rate grid, augmentation and splits are the protocol's.
"""

from __future__ import annotations

import pytest
from fakes.eval_fakes import eval_argv, make_geobench_task, read_results

from geodino import cli
from geodino.cli import compose

SIZES = {
    "loveda": ("task.window=32", "task.stride=32", "task.train_stride=32", "task.epochs=1", "task.decoder_dim=16"),
    "canopy": ("task.patch=32", "task.stride=16", "task.epochs=1", "task.decoder_dim=16", "task.block_size=8"),
    "geobench": ("task.epochs=1", "task.seg_epochs=1", "task.decoder_dim=16"),
}


@pytest.mark.parametrize("task,expect", [
    ("loveda", {"head": "upernet", "layers": "spaced:4", "window": 512, "lr": 6e-5, "weight_decay": 0.01,
                "augment": ["hflip", "resized_crop"], "epochs": 64}),
    ("geobench", {"head": "dpt", "layers": "spaced:4", "seg_lrs": [3e-5, 1e-4, 3e-4, 1e-3], "bands": "rgb",
                  "scaling": "minmax", "train_on_trainval": True}),
    ("canopy", {"head": "dpt", "layers": "spaced:4", "patch": 256, "block_size": 50, "border": 3, "val_split": "val"}),
])
def test_paper_configs_name_the_paper_settings(task, expect):
    t = compose("eval", [f"task={task}_paper", "root=/x"]).task
    assert t.name == task and t.protocol == "paper"
    for k, v in expect.items():
        got = t[k]
        assert (list(got) if not isinstance(got, (str, int, float, bool)) else got) == pytest.approx(v), k


def test_paper_protocols_run_from_one_command_on_fake_data(loveda_root, canopy_root, tmp_path):
    gb = tmp_path / "gb"
    make_geobench_task(gb, "m-fake-cls", "cls", n_classes=3)
    make_geobench_task(gb, "m-fake-seg", "seg", n_classes=3, size=32, n=(4, 2, 2), seed=2)
    for task, root in (("loveda", loveda_root), ("canopy", canopy_root), ("geobench", gb)):
        argv = eval_argv(f"{task}_paper", root, tmp_path, *SIZES[task], "n_figures=0")
        argv[3] = f"run_dir={tmp_path / task}"
        assert cli.main(argv) == 0, task
        r = read_results(tmp_path / task)
        assert r["protocol"]["name"] == "paper" and r["protocol"]["layers"] == [0, 1], task  # spaced:4 on 2 blocks
        if task == "loveda":
            assert set(r["heads"]) == {"upernet"} and r["trained_on"] == "images"
            assert r["augment"] == ["hflip", "resized_crop"]
        elif task == "canopy":
            sweep = r["heads"]["dpt"]["lr_sweep"]
            assert sweep["selected_on"] == "val" and sorted(sweep["val"]) == sorted(["3e-05", "0.0001", "0.0003", "0.001"])
        else:
            seg = r["tasks"]["m-fake-seg"]["heads"]["dpt"]["lr_sweep"]
            assert seg["selected_on"] == "valid" and seg["refit_on"] == "train+valid" and len(seg["val"]) == 4
            assert len(r["tasks"]["m-fake-cls"]["probes"]["linear"]["lr_sweep"]["val"]) == 7
