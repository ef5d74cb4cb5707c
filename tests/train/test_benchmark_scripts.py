"""The benchmark scripts drive the real trainer and data path: a change to those must not break them silently.
These run each script at toy size and check the numbers it prints are there and sane (never the times)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_step_benchmark_runs_the_trainer_at_toy_size():
    text = _run("benchmarks/train_step.py", "--arch", "vit_tiny", "--batch", "2", "--global-size", "32",
                "--local-size", "16", "--n-local", "2", "--prototypes", "64", "--hidden", "64", "--bottleneck", "32",
                "--steps", "2", "--threads", "1")
    step = re.search(r"step \(median\)\s+([0-9.]+) s", text)
    floor = re.search(r"step = ([0-9.]+)x the floor", text)
    assert step and float(step.group(1)) > 0, text
    assert floor and float(floor.group(1)) > 0, text


def test_learning_benchmark_trains_and_probes_a_geodino_arm(tmp_path):
    """The geodino arm end to end at 2 steps (the LightlyTrain arms need the peer's own environment); a second run
    into the same folder is refused without --overwrite."""
    import json

    text = _run("benchmarks/learning.py", "--steps", "2", "--batch", "4", "--arms", "small", "--seeds", "0", "1",
                "--threads", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "learning.json").read_text())
    (arm,) = result["arms"]
    assert arm["arm"] == "small" and arm["images_seen"] == 8
    assert 0 < arm["dense_miou"] <= 100 and len(result["floors"]["random_init"]) == 2
    assert re.search(r"^small\s+[0-9.]+", text, re.M), text
    again = subprocess.run([sys.executable, "benchmarks/learning.py", "--steps", "2", "--arms", "small", "--out",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr and (tmp_path / "small").is_dir()
