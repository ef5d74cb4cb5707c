"""Metrics loggers (issue #15): `train.loggers=[jsonl,tensorboard]` writes the same scalars to metrics.jsonl and to
TensorBoard events; an unknown logger is a config error."""

from __future__ import annotations

import json

import pytest

from geodino import cli
from geodino.errors import GeodinoError
from geodino.runs import open_metrics

pytest.importorskip("tensorboard", reason="the tensorboard logger is optional")


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder)).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_a_training_run_logs_the_jsonl_scalars_to_tensorboard(tmp_path):
    from train.test_pretrain import TINY

    run = tmp_path / "run"
    assert cli.main(["train", f"run_dir={run}", *TINY, "train.iterations=2", "train.checkpoint_every=0",
                     "train.loggers=[jsonl,tensorboard]"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tb = _scalars(run / "tensorboard")
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("loss", "loss_dino_global", "lr"):
            assert tb[key][r["step"]] == pytest.approx(r[key], rel=1e-6), key


def test_loggers_resume_and_refuse_unknown_names(tmp_path):
    m = open_metrics(tmp_path, ["jsonl", "tensorboard"])
    for step in range(4):
        m.write({"step": step, "loss": float(step), "note": "text is skipped", "bad": float("nan")})
    m.close()
    m = open_metrics(tmp_path, ["jsonl", "tensorboard"], truncate_after_step=1)  # a resume from step 2
    m.write({"step": 2, "loss": 20.0})
    m.close()
    assert [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.0, 1.0, 20.0]
    assert _scalars(tmp_path / "tensorboard")["loss"] == {0: 0.0, 1: 1.0, 2: 20.0}
    with pytest.raises(GeodinoError, match="unknown metrics logger"):
        open_metrics(tmp_path, ["csv"])
    assert cli.main(["train", f"run_dir={tmp_path / 'x'}", "train.loggers=[wandb]"]) == 2
