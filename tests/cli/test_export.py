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


def test_distilled_students_export_to_safetensors_and_load_back_without_unpickling(tmp_path, monkeypatch, capsys):
    """part=students (issue #15, safe artifacts): every student of a distill run becomes <name>.safetensors with its
    contract and provenance; load_backbone reads it with no torch.load and the features are identical."""
    import json

    from safetensors import safe_open

    torch.manual_seed(0)
    run = tmp_path / "distill"
    students = {}
    for name, bands in (("vit_tiny", ["B04", "B03", "B02", "B08"]), ("vit_rgb", ["B04", "B03", "B02"])):
        bb = build_backbone("geodino_vit_tiny", in_chans=len(bands), embed_dim=32, depth=1, num_heads=1)
        bb.geodino_contract = bb.geodino_contract.with_data(bands=bands, mean=[0.3] * len(bands), std=[0.2] * len(bands))
        save_atomic(backbone_payload(bb.state_dict(), bb.geodino_contract, weights="ema", step=2, stage="distill",
                                     teacher="/runs/teacher"), run / "students" / f"{name}.pt")
        students[name] = bb.eval()
    assert cli.main(["export", f"checkpoint={run}", "part=students", "format=safetensors"]) == 0
    x = torch.rand(2, 4, 32, 32)
    want = {n: bb.forward_features(x[:, :bb.geodino_contract.in_chans]) for n, bb in students.items()}
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load: the artifact must not unpickle"))
    for name, bb in students.items():
        out = run / "students" / f"{name}.safetensors"
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "geodino-backbone"
        assert json.loads(meta["geodino_checkpoint"]) == {"weights": "ema", "step": 2, "stage": "distill",
                                                           "teacher": "/runs/teacher"}
        model = load_backbone(out)
        assert model.geodino_contract.to_dict() == bb.geodino_contract.to_dict()
        got = model.forward_features(x[:, :bb.geodino_contract.in_chans])
        for k in ("x_norm_clstoken", "x_norm_patchtokens"):
            assert torch.equal(got[k], want[name][k]), (name, k)
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["export", f"checkpoint={run}", "part=students", "format=safetensors"]) == 2  # nothing replaced
    assert _error(capsys).endswith(f"out {run / 'students' / 'vit_rgb.safetensors'} exists; overwrite=true replaces it")
    assert cli.main(["export", f"checkpoint={tmp_path / 'empty'}", "part=students", "format=safetensors"]) == 2
    assert "has no students/*.pt" in _error(capsys)
    # one student file, by its path: the backbone export of it is the same safetensors backbone file
    out = tmp_path / "one.safetensors"
    assert cli.main(["export", f"checkpoint={run / 'students' / 'vit_tiny.pt'}", "format=safetensors",
                     f"out={out}"]) == 0
    assert torch.equal(load_backbone(out).forward_features(x)["x_norm_clstoken"], want["vit_tiny"]["x_norm_clstoken"])


def test_a_backbone_safetensors_of_the_earlier_layout_still_loads(tmp_path):
    """Files exported before the geodino format was recorded (metadata ``format: dinov3-official-keys`` and the
    contract) load as backbones and open as backbone files."""
    import json

    from safetensors.torch import save_file

    from geodino.checkpoint import Checkpoint

    torch.manual_seed(0)
    bb = build_backbone("geodino_vit_tiny", in_chans=3, embed_dim=32, depth=1, num_heads=1).eval()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(path),
              metadata={"format": "dinov3-official-keys", "geodino_contract": json.dumps(bb.geodino_contract.to_dict())})
    ckpt = Checkpoint.open(path)
    assert ckpt.is_backbone_file and ckpt.contract.to_dict() == bb.geodino_contract.to_dict()
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(load_backbone(path).forward_features(x)["x_norm_clstoken"], bb.forward_features(x)["x_norm_clstoken"])
