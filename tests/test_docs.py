"""docs/ARCHITECTURE.md's worked example ("Adding a stage") runs as written: one module and one config file,
found through $GEODINO_CONFIG_PATH and an import string, trained by the shared run skeleton."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from geodino import cli
from geodino.checkpoint import Checkpoint
from geodino.models import load_backbone

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def _block(lang: str, first_line: str) -> str:
    for body in re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"no ```{lang} block starting with {first_line!r} in {DOC}")


def test_the_worked_stage_example_trains_resumes_and_loads(tmp_path, monkeypatch):
    (tmp_path / "cosine_stage.py").write_text(_block("python", "# cosine_stage.py"))
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "cosine.yaml").write_text(_block("yaml", "# stage/cosine.yaml"))
    monkeypatch.setenv("GEODINO_CONFIG_PATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    small = ["train.batch_size=2", "progress=false", "train.monitor_every=0", "train.pca_png=false",
             "stage.crops.global_crops_size=32", "stage.crops.local_crops_size=16", "stage.crops.local_crops_number=1",
             "stage.dino.head_n_prototypes=16", "stage.ibot.head_n_prototypes=16"]
    assert cli.main(["train", f"run_dir={tmp_path / 'pre'}", "train.iterations=1", *small]) == 0
    common = ["stage=cosine", f"teacher={tmp_path / 'pre'}", "train.batch_size=2", "progress=false",
              "stage.crop_size=32", "train.checkpoint_every=1", f"run_dir={tmp_path / 'cos'}"]
    assert cli.main(["train", *common, "train.iterations=2"]) == 0
    ckpt = Checkpoint.open(tmp_path / "cos")
    assert ckpt.stage == "cosine" and ckpt.step == 2 and ckpt.config["stage"]["meta_arch"] == "cosine_stage:CosineStage"
    rows = [line for line in (tmp_path / "cos" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    # resuming continues the same run (the skeleton's exact resume holds for a plug-in stage too)
    assert cli.main(["train", *common, "train.iterations=3"]) == 0
    assert Checkpoint.open(tmp_path / "cos").step == 3
    student = load_backbone(tmp_path / "cos", which="student")
    assert student.geodino_contract.n_bands == 13 and student.geodino_contract.name == "geodino_vit_tiny"
    with torch.no_grad():
        out = student.forward_features(torch.zeros(1, 13, 32, 32))
    assert out["x_norm_clstoken"].shape == (1, 96)
    sys.modules.pop("cosine_stage", None)
