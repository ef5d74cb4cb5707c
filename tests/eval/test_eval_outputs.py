"""`geodino eval` outputs (issue #14 items 2 and 10): an existing results.json needs overwrite=true, a failed run
leaves no run folder, and a released name without weights= is reported as a random backbone."""

from __future__ import annotations

import json
import logging

import numpy as np
from fakes.eval_fakes import eval_argv, read_results

from geodino import cli
from geodino.testing import cli_error_lines

FAST = ("task.benchmark_task=m-fake-cls", "task.probes=[knn]", "task.knn_k=3", "task.batch_size=8")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_random_backbone_is_warned_and_reported(geobench_root, tmp_path, capsys, official_tiny_weights):
    logger = logging.getLogger("geodino")
    records = _Records()
    logger.addHandler(records)
    try:
        assert cli.main(eval_argv("geobench", geobench_root, tmp_path, *FAST, "backbone=geodino_vit_tiny")) == 0
    finally:
        logger.removeHandler(records)
    warned = [m for m in records.messages if "geodino_vit_tiny loaded without weights=" in m and "RANDOM" in m]
    assert len(warned) == 1  # once per load
    assert read_results(tmp_path / "run")["backbone"]["random_weights"] is True
    assert "RANDOM backbone weights: geodino_vit_tiny was loaded without weights=" in \
        (tmp_path / "run" / "report.md").read_text()
    assert "RANDOM backbone weights" in capsys.readouterr().out

    trained = tmp_path / "trained"
    assert cli.main(eval_argv("geobench", geobench_root, trained, *FAST, "backbone=geodino_vit_tiny",
                              f"weights={official_tiny_weights}")) == 0
    assert read_results(trained / "run")["backbone"]["random_weights"] is False
    assert "RANDOM" not in (trained / "run" / "report.md").read_text() and "RANDOM" not in capsys.readouterr().out


def test_results_are_never_overwritten_without_overwrite(geobench_root, tmp_path, capsys):
    assert cli.main(eval_argv("geobench", geobench_root, tmp_path, *FAST)) == 0
    results = tmp_path / "run" / "results.json"
    before = results.read_text()
    capsys.readouterr()
    assert cli.main(eval_argv("geobench", geobench_root, tmp_path, *FAST)) == 2
    lines = cli_error_lines(capsys.readouterr().err)
    assert lines == [f"error: geodino eval: eval output {results} exists; overwrite=true replaces it"]
    assert results.read_text() == before
    assert cli.main(eval_argv("geobench", geobench_root, tmp_path, *FAST, "overwrite=true")) == 0
    assert json.loads(results.read_text())["results"]["task"] == "geobench"


def test_a_failed_eval_leaves_no_run_folder(loveda_root, tmp_path, capsys):
    from PIL import Image

    bad = loveda_root / "Val" / "Rural" / "masks_png" / "100.png"
    m = np.array(Image.open(bad))
    m[5, 5] = 9
    Image.fromarray(m, "L").save(bad)
    argv = eval_argv("loveda", loveda_root, tmp_path, "task.window=32", "task.stride=16", "task.epochs=1")
    argv = [a if not a.startswith("run_dir=") else f"run_dir={tmp_path / 'runs' / 'a' / 'run'}" for a in argv]
    assert cli.main(argv) == 2
    assert "label value(s) 9" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
