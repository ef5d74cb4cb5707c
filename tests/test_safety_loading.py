"""Loading never runs code, one run per run folder, resume checks what it resumes (issue "Nothing runs, nothing is
lost, nothing is silent", items 1, 4, 5 and 10).

A pickle payload is planted into a real training checkpoint, a backbone file and a dino.txt model, and every entry
point that reads a file a user may have received is fed with it: each refuses with one line and the payload never
runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geodino import cli
from geodino.checkpoint import Checkpoint, latest_checkpoint
from geodino.errors import CheckpointError, GeodinoError
from geodino.models import load_backbone
from geodino.runs import RunFolderBusy, RunLock, claim_run_dir
from geodino.testing import cli_error_lines

TINY = ["train.batch_size=4", "stage.crops.global_crops_size=32", "stage.crops.local_crops_size=16",
        "stage.crops.local_crops_number=2", "stage.dino.head_n_prototypes=32", "stage.dino.head_hidden_dim=32",
        "stage.dino.head_bottleneck_dim=16", "stage.ibot.head_n_prototypes=32", "stage.ibot.head_hidden_dim=32",
        "stage.ibot.head_bottleneck_dim=16", "data.chip_size=48", "train.pca_png=false", "progress=false",
        "train.monitor_every=0"]


class Payload:
    """Unpickling this creates `marker`: proof that a load ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("safety") / "pre"
    assert cli.main(["train", f"run_dir={run}", *TINY, "train.iterations=2", "train.checkpoint_every=2"]) == 0
    return run


def _planted(src: Path, dst: Path, marker: Path) -> Path:
    obj = torch.load(src, weights_only=True)
    obj["evil"] = Payload(marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, dst)
    return dst


def test_geodino_files_load_with_weights_only(run):
    ckpt = torch.load(latest_checkpoint(run / "checkpoints"), weights_only=True)  # no exception: only plain values
    assert ckpt["format"] == "geodino-train-checkpoint" and isinstance(ckpt["config"], dict)
    assert torch.is_tensor(ckpt["rng"]["torch"]) and torch.is_tensor(ckpt["rng"]["numpy"][1])


def test_a_planted_payload_is_refused_by_every_loader(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _planted(latest_checkpoint(run / "checkpoints"), tmp_path / "evil" / "step_00000002.pt", marker)
    with pytest.raises(CheckpointError, match="refused: loading it could run code.*convert"):
        Checkpoint.open(evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(evil.parent)  # a folder resolves to its latest checkpoint
    commands = [
        ["export", f"checkpoint={evil}", f"out={tmp_path / 'x.pth'}"],
        ["train", "stage=gram", f"init={evil}", f"run_dir={tmp_path / 'g'}", *TINY],
        ["train", "stage=gram", f"init={run}", f"stage.gram.ckpt={evil}", f"run_dir={tmp_path / 'g2'}", *TINY],
        ["train", "stage=distill", f"teacher={evil}", "students=[vit_tiny]", f"run_dir={tmp_path / 'd'}", *TINY],
        ["segment", f"checkpoint={evil}", f"input={tmp_path / 'nope.tif'}", "prompts=[water]"],
        ["curate", "action=embed", f"backbone={evil}", f"out={tmp_path / 'emb'}", "progress=false"],
    ]
    for argv in commands:
        assert cli.main(argv) == 2, argv
        err = cli_error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "refused" in err[0], (argv, err)
    # resuming a run folder whose latest checkpoint was replaced
    resumed = tmp_path / "resume"
    _planted(latest_checkpoint(run / "checkpoints"), resumed / "checkpoints" / "step_00000002.pt", marker)
    assert cli.main(["train", f"run_dir={resumed}", *TINY, "train.iterations=3"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_a_trusted_old_checkpoint_converts_once_and_then_resumes(run, tmp_path):
    import numpy as np
    import random

    old = torch.load(latest_checkpoint(run / "checkpoints"), weights_only=True)
    old["rng"]["numpy"] = np.random.get_state()  # the pickle-era layout: a numpy array in the RNG state
    old["rng"]["python"] = random.getstate()
    legacy = tmp_path / "legacy.pt"
    torch.save(old, legacy)
    with pytest.raises(CheckpointError, match="python -m geodino.checkpoint convert"):
        Checkpoint.open(legacy)
    cmd = [sys.executable, "-m", "geodino.checkpoint", "convert", str(legacy), str(tmp_path / "new" / "step_00000002.pt")]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "--trust" in refused.stderr
    done = subprocess.run([*cmd, "--trust"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ckpt = Checkpoint.open(tmp_path / "new")
    assert ckpt.step == 2 and ckpt.stage == "pretrain"
    new_run = tmp_path / "new_run"
    (new_run / "checkpoints").mkdir(parents=True)
    os.replace(tmp_path / "new" / "step_00000002.pt", new_run / "checkpoints" / "step_00000002.pt")
    (new_run / "config.yaml").write_text((run / "config.yaml").read_text())
    assert cli.main(["train", f"run_dir={new_run}", *TINY, "train.iterations=3", "train.checkpoint_every=1"]) == 0
    assert Checkpoint.open(new_run).step == 3


def test_one_run_per_run_folder(tmp_path):
    folder = tmp_path / "r"
    with RunLock(folder):
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()}"):
            RunLock(folder).acquire()
        assert cli.main(["train", f"run_dir={folder}", *TINY, "train.iterations=1"]) == 2
    assert not (folder / ".lock").exists()
    # a lock left by a process that is gone is replaced
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                              "started": "yesterday"}))
    with RunLock(folder) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    a = claim_run_dir("train", "pretrain", base=tmp_path)
    b = claim_run_dir("train", "pretrain", base=tmp_path)
    assert a != b and a.is_dir() and b.is_dir() and b.name.startswith(a.name)


def test_resume_refuses_other_data_or_model_and_records_other_changes(run, tmp_path, capsys):
    folder = tmp_path / "run"
    args = ["train", f"run_dir={folder}", *TINY, "train.checkpoint_every=1"]
    assert cli.main([*args, "train.iterations=2"]) == 0
    first_config = (folder / "config.yaml").read_text()
    assert cli.main([*args, "train.iterations=3", "data.bands=[B04,B03,B02]"]) == 2
    err = cli_error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "data.bands" in err[0] and "new run_dir=" in err[0]
    assert cli.main([*args, "train.iterations=3", "model=vits16"]) == 2
    assert "model.name" in capsys.readouterr().err
    assert cli.main([*args, "train.iterations=4", "optim.lr=5e-4"]) == 0
    history = (folder / "config_history.yaml").read_text()
    assert "train.iterations" in history and "optim.lr" in history and "resumed_at_step: 2" in history
    assert (folder / "config.yaml").read_text() == first_config  # the settings the run started with
    assert Checkpoint.open(folder).step == 4


def test_a_failed_new_run_leaves_no_folder(tmp_path):
    folder = tmp_path / "new"
    assert cli.main(["train", f"run_dir={folder}", "data=sat", f"data.paths=[{tmp_path / 'missing'}]", *TINY]) == 2
    assert not folder.exists()


def test_errors_are_geodino_errors():
    assert issubclass(RunFolderBusy, GeodinoError) and issubclass(CheckpointError, GeodinoError)


def test_no_loader_in_geodino_unpickles_arbitrary_code():
    """Static guard (issue #15): every torch.load passes weights_only=True, except `checkpoint.convert_legacy`, which
    runs only on a file the user vouches for (``--trust``); no np.load allows pickles; hubconf.py loads through
    load_backbone."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for path in [*sorted((root / "geodino").rglob("*.py")), root / "hubconf.py"]:
        tree = ast.parse(path.read_text())
        funcs = {id(n): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(root)}:{node.lineno}"
            if name == "torch.load" and kw.get("weights_only") != "True" and funcs.get(id(node)) != "convert_legacy":
                bad.append(f"{where} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and kw.get("allow_pickle", "False") != "False":
                bad.append(f"{where} np.load with allow_pickle")
            if name in ("pickle.load", "pickle.loads"):
                bad.append(f"{where} {name}")
    assert not bad, bad
