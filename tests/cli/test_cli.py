"""CLI dispatch, help, config composition of every group, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from geodino import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geodino.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_verb(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "eval", "segment", "curate", "export", "info"):
        assert f"  {verb}" in out


@pytest.mark.parametrize("verb", ["train", "eval", "segment", "curate", "export", "info"])
def test_every_verb_has_help(verb, capsys):
    assert cli.main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: geodino {verb}")


def test_train_help_lists_groups_and_options(capsys):
    cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "stage: distill, gram, highres, pretrain, text" in out
    assert "data: captions, chips, mix, nat, sample_captions, sample_nat, sample_sat, sat" in out
    assert "recipe: reference, small" in out
    for m in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16", "convnext_tiny", "convnext_large", "vit_tiny"):
        assert m in out


def test_train_gram_sat_composes():
    cfg = cli.compose("train", ["stage=gram", "data=sat"])
    assert cfg.stage.name == "gram"
    assert cfg.stage.gram.use_loss is True
    # gram inherits the pretraining recipe
    assert cfg.stage.dino.koleo_loss_weight == pytest.approx(0.1)
    assert cfg.data.name == "sat"


@pytest.mark.parametrize("argv,task", [(["eval", "loveda"], "loveda"), (["eval", "task=loveda"], "loveda"),
                                       (["eval", "canopy"], "canopy"), (["eval", "geobench", "root=/x"], "geobench")])
def test_eval_bare_word_selects_task(argv, task):
    parsed = cli.parse_argv(argv)
    cfg = cli.compose(parsed.verb, parsed.overrides)
    assert cfg.task.name == task


@pytest.mark.parametrize("group", ["stage", "data", "model"])
def test_every_option_of_every_train_group_composes(group):
    for option in cli.config_groups("train")[group]:
        cfg = cli.compose("train", [f"{group}={option}"])
        assert cfg[group].name, (group, option)


def test_every_model_option_names_a_registered_backbone():
    from geodino.models.registry import ARCHS

    for option in cli.config_groups("train")["model"]:
        cfg = cli.compose("train", [f"model={option}"])
        assert cfg.model.name in ARCHS, option


@pytest.mark.parametrize("verb", ["eval", "segment", "curate", "export"])
def test_other_verbs_compose(verb):
    cfg = cli.compose(verb, [])
    assert cfg is not None


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["trian"], "unknown verb 'trian'; choose one of: train, eval, segment, curate, export, info"),
        (["train", "stage=nope"], "unknown stage 'nope'; choose one of: distill, gram, highres, pretrain, text"),
        (["train", "data=nope"], "unknown data 'nope'; choose one of: captions, chips, mix, nat, sample_captions, sample_nat, sample_sat, sat"),
        (["eval", "nope"], "unknown task 'nope'; choose one of: canopy, canopy_paper, geobench, geobench_paper, loveda, loveda_paper, ov"),
        (["train", "foo=1"], "unknown option 'foo'"),
        (["train", "--bogus"], "unknown flag '--bogus'"),
        (["train", "loveda"], "'loveda' is not an override"),
    ],
)
def test_bad_input_is_one_line_without_traceback(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_sat_without_paths_dispatches_and_fails_cleanly():
    r = run_cli("train", "stage=gram", "data=sat")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "data.paths" in r.stderr.strip().splitlines()[-1]


def test_info_reports_versions_devices_and_configs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "threads:" in out and "configs:" in out
    assert str(cli.configs_dir()) in out


def test_cfg_flag_prints_composed_config(capsys):
    assert cli.main(["train", "stage=highres", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "name: highres" in out and "probabilities:" in out


def test_console_script_entry_point_is_declared():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["geodino"] == "geodino.cli:main"
