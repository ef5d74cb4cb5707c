"""`geodino export` never replaces its own checkpoint or a run's training checkpoints, needs overwrite=true for an
existing file, writes atomically (a full disk leaves no partial file, one line), and its official-layout file
loads back by its path alone (issue #14 items 2, 9, 10)."""

from __future__ import annotations

import errno

import pytest
import torch

from geodino import cli
from geodino.checkpoint import backbone_payload, save_atomic
from geodino.models import build_backbone, load_backbone
from geodino.models import weights as weights_mod
from geodino.testing import cli_error_lines


@pytest.fixture
def run(tmp_path):
    """A run folder whose checkpoints/ holds a geodino backbone file named like a training checkpoint."""
    torch.manual_seed(0)
    bb = build_backbone("geodino_vit_tiny", in_chans=4)
    bb.geodino_contract = bb.geodino_contract.with_data(bands=["R", "G", "B", "NIR"], mean=[0.3] * 4, std=[0.2] * 4)
    save_atomic(backbone_payload(bb.state_dict(), bb.geodino_contract), tmp_path / "run" / "checkpoints" /
                "step_00000030.pt")
    return tmp_path / "run", bb


def _error(capsys) -> str:
    lines = cli_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: geodino export: "), lines
    return lines[0]


def test_export_refuses_its_checkpoint_training_checkpoints_and_existing_files(run, capsys):
    run_dir, _ = run
    step = run_dir / "checkpoints" / "step_00000030.pt"
    data = step.read_bytes()
    assert cli.main(["export", f"checkpoint={step}", f"out={step}", "overwrite=true"]) == 2
    assert f"out {step} would overwrite the input {step}" in _error(capsys)
    assert cli.main(["export", f"checkpoint={run_dir}", f"out={step}", "overwrite=true"]) == 2  # the run's latest
    assert f"would overwrite the input {step}" in _error(capsys)
    other = run_dir / "checkpoints" / "step_00000040.pt"
    assert cli.main(["export", f"checkpoint={step}", f"out={other}", "overwrite=true"]) == 2
    assert f"out={other} is a training checkpoint's name in a run's checkpoints/ folder" in _error(capsys)
    assert step.read_bytes() == data

    assert cli.main(["export", f"checkpoint={run_dir}"]) == 0  # default: beside the checkpoint
    out = run_dir / "backbone_teacher.pth"
    assert out.is_file()
    capsys.readouterr()
    assert cli.main(["export", f"checkpoint={run_dir}"]) == 2
    assert _error(capsys).endswith(f"out {out} exists; overwrite=true replaces it")
    assert cli.main(["export", f"checkpoint={run_dir}", "overwrite=true"]) == 0


def test_disk_full_during_export_is_one_line_and_leaves_no_partial_file(run, tmp_path, capsys, monkeypatch):
    run_dir, _ = run
    real_save = torch.save

    def full(obj, f, *a, **k):  # part of the file lands, then the disk is full
        real_save({"x": torch.zeros(3)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights_mod.torch, "save", full)
    out = tmp_path / "exports" / "bb.pth"
    assert cli.main(["export", f"checkpoint={run_dir}", f"out={out}"]) == 2
    monkeypatch.undo()
    msg = _error(capsys)
    assert f"no space left on device writing {out} (needs ~" in msg and "MB" in msg
    assert list(out.parent.iterdir()) == []


def test_an_official_export_loads_back_by_its_path(run, tmp_path):
    run_dir, bb = run
    out = tmp_path / "official.pth"
    assert cli.main(["export", f"checkpoint={run_dir}", "format=official", f"out={out}"]) == 0
    sd = torch.load(out, weights_only=True)
    assert "cls_token" in sd and "format" not in sd  # a flat official state dict: no contract
    model = load_backbone(out)
    c = model.geodino_contract
    assert c.name == "geodino_vit_tiny" and c.in_chans == 4 and c.kwargs["num_heads"] == 3
    for k, v in bb.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.rand(1, 4, 32, 32)
    torch.testing.assert_close(model.forward_features(x)["x_norm_clstoken"],
                               bb.eval().forward_features(x)["x_norm_clstoken"])
