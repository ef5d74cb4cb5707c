"""Report extras: per-class tables, confusion-matrix and LR-sweep PNGs, and `geodino eval compare`."""

from __future__ import annotations

from fakes.eval_fakes import eval_argv, make_canopy, read_results
from PIL import Image

from geodino import cli

FAST = ("task.window=32", "task.stride=32", "task.epochs=3", "task.batch_size=4")


def test_report_has_per_class_tables_confusion_and_sweep_pngs(loveda_root, tmp_path):
    assert cli.main(eval_argv("loveda", loveda_root, tmp_path, *FAST, "task.lrs=[1e-3,1e-2]", "task.val_split=val",
                              "n_figures=1")) == 0
    run = tmp_path / "run"
    r = read_results(run)
    lin = r["heads"]["linear"]
    assert len(lin["confusion"]) == 8 and sum(map(sum, lin["confusion"])) == lin["labelled_pixels"]
    for name in ("confusion_linear.png", "lr_sweep_linear.png"):
        with Image.open(run / "figures" / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    md = (run / "report.md").read_text()
    assert "### Per-class IoU — heads.linear" in md and "| building |" in md and "| **mean** |" in md
    assert "### Learning-rate sweep — heads.linear (scored on val)" in md and "← chosen" in md
    assert "![confusion heads.linear](figures/confusion_linear.png)" in md


def test_compare_two_backbones_on_one_task(loveda_root, tmp_path, official_tiny_weights, capsys):
    a = eval_argv("loveda", loveda_root, tmp_path, *FAST, "n_figures=0")
    b = eval_argv("loveda", loveda_root, tmp_path, *FAST, "n_figures=0", f"weights={official_tiny_weights}",
                  "task.head=[linear,light_decoder]")
    a[3], b[3] = f"run_dir={tmp_path / 'a'}", f"run_dir={tmp_path / 'b'}"
    assert cli.main(a) == 0 and cli.main(b) == 0
    capsys.readouterr()
    out_md = tmp_path / "cmp.md"
    assert cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), f"out={out_md}"]) == 0
    table = capsys.readouterr().out
    assert table == out_md.read_text()
    ra, rb = read_results(tmp_path / "a"), read_results(tmp_path / "b")
    row = next(line for line in table.splitlines() if line.startswith("| heads.linear.miou |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == round(ra["heads"]["linear"]["miou"], 2)
    assert float(cells[3]) == round(rb["heads"]["linear"]["miou"] - ra["heads"]["linear"]["miou"], 2)
    assert "geodino_vit_tiny (geodino_vit_tiny_official.pth)" in table and "| Δ |" in table
    assert "| heads.light_decoder.miou | — |" in table  # only run b has it
    assert "Protocols differ" in table and "- heads:" in table

    make_canopy(tmp_path / "chm")
    c = eval_argv("canopy", tmp_path / "chm", tmp_path, "task.patch=32", "task.epochs=1", "n_figures=0")
    c[3] = f"run_dir={tmp_path / 'c'}"
    assert cli.main(c) == 0
    capsys.readouterr()
    assert cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "different tasks" in capsys.readouterr().err
    assert cli.main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err
