"""The `geodino curate` verb (geodino.verbs.curate): band statistics, embed, balance and retrieve on the packaged
samples, and the lists it writes read back by `data=` configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geodino import cli
from geodino.data import lists
from geodino.data.sources import build_source
from geodino.data.stats import STATS_FORMAT


def test_cli_stats_on_the_packaged_sample_writes_stats(tmp_path, capsys):
    assert cli.main(["curate", "action=stats", f"out={tmp_path}", "stats_chips=6", "progress=false"]) == 0
    doc = json.loads((tmp_path / "band_stats.json").read_text())
    assert doc["format"] == STATS_FORMAT
    assert doc["bands"][:4] == ["B01", "B02", "B03", "B04"] and len(doc["bands"]) == 13
    assert len(doc["mean"]) == len(doc["std"]) == 13
    assert all(0 < m < 1 for m in doc["mean"]) and all(s > 0 for s in doc["std"])
    assert doc["items"] == 6 and doc["pixels"] == 6 * 96 * 96 and doc["scale"] == 10000.0
    assert "data.stats_file=" in capsys.readouterr().out
    # a data= config can point at it (bands matched by name)
    cfg = cli.compose("train", ["data=sample_sat", f"data.stats_file={tmp_path / 'band_stats.json'}",
                                "data.bands=[B04,B03,B02]"])
    info = build_source(cfg.data)
    assert info.mean == [doc["mean"][3], doc["mean"][2], doc["mean"][1]]
    assert info.std == [doc["std"][3], doc["std"][2], doc["std"][1]]


def test_cli_balance_and_retrieve_write_lists_that_data_configs_accept(tmp_path):
    common = ["progress=false", "image_size=32", "batch_size=8"]
    # photos -> file list
    assert cli.main(["curate", "action=balance", "data=sample_nat", f"out={tmp_path / 'nat'}", "n_samples=3",
                     "levels=[3]", *common]) == 0
    listed = (tmp_path / "nat" / "balanced.txt").read_text().split("\n")
    files = [l for l in listed if l and not l.startswith("#")]
    assert len(files) == 3
    cfg = cli.compose("train", ["data=sample_nat", f"data.file_list={tmp_path / 'nat' / 'balanced.txt'}"])
    assert [str(f) for f in build_source(cfg.data).source.files] == files

    # raster chips -> chip list; embed once, balance and retrieve from the saved embeddings
    emb = tmp_path / "pool"
    band_cfg = ["data=sample_sat", "data.mean=[0.1,0.1,0.1]", "data.std=[0.1,0.1,0.1]", "data.bands=[B04,B03,B02]",
                "data.chip_size=32"]
    assert cli.main(["curate", "action=embed", *band_cfg, "pool_size=24", f"out={emb}", *common]) == 0
    assert np.load(emb / "embeddings.npy").shape == (24, 96)
    assert cli.main(["curate", "action=balance", f"embeddings={emb}", f"out={tmp_path / 'bal'}", "n_samples=6",
                     "levels=[4]", "resampling_steps=1", "resampling_size=2", *common]) == 0
    chips, meta = lists.read_chip_list(tmp_path / "bal" / "balanced.txt")
    assert len(chips) == 6 and set(chips) <= set(range(24)) and meta["chip_size"] == 32
    np.save(tmp_path / "q.npy", np.load(emb / "embeddings.npy")[[0, 5]])
    assert cli.main(["curate", "action=retrieve", f"embeddings={emb}", f"queries={tmp_path / 'q.npy'}", "k=3",
                     f"out={tmp_path / 'ret'}", *common]) == 0
    got, _ = lists.read_chip_list(tmp_path / "ret" / "retrieved.txt")
    # (a random-init backbone embeds every chip alike, so only the shape of the answer is checked here;
    # test_retrieve_returns_the_true_nearest_neighbours checks the neighbours themselves)
    assert 3 <= len(got) <= 6 and set(got.tolist()) <= set(range(24))

    # the chip list restricts a raster source to those chips
    cfg = cli.compose("train", [*band_cfg, f"data.chip_list={tmp_path / 'bal' / 'balanced.txt'}"])
    src = build_source(cfg.data).source
    full = build_source(cli.compose("train", band_cfg).data).source
    torch.testing.assert_close(src[1], full[int(chips[1])])
    torch.testing.assert_close(src[len(chips)], full[int(chips[0])])  # wraps around

    # a chip list made for another chip size is refused
    cfg = cli.compose("train", ["data=sample_sat", "data.chip_size=64",
                                f"data.chip_list={tmp_path / 'bal' / 'balanced.txt'}"])
    with pytest.raises(Exception, match="32 px chips but data.chip_size=64"):
        build_source(cfg.data)


def test_cli_retrieve_without_queries_is_one_line(capsys):
    assert cli.main(["curate", "action=retrieve", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "queries=" in err and "Traceback" not in err


def test_curate_never_overwrites_without_overwrite_and_leaves_no_folder_on_failure(tmp_path, capsys):
    from geodino.testing import cli_error_lines

    stats = ["curate", "action=stats", f"out={tmp_path}", "stats_chips=2", "progress=false"]
    assert cli.main(stats) == 0
    written = (tmp_path / "band_stats.json").read_text()
    capsys.readouterr()
    assert cli.main(stats) == 2
    assert cli_error_lines(capsys.readouterr().err) == [
        f"error: geodino curate: output {tmp_path / 'band_stats.json'} exists; overwrite=true replaces it"]
    assert (tmp_path / "band_stats.json").read_text() == written
    assert cli.main([*stats, "overwrite=true"]) == 0

    # an output may not land on an input, whatever overwrite says
    assert cli.main(["curate", "action=stats", f"out={tmp_path / 'band_stats.json'}", "progress=false",
                     f"data.stats_file={tmp_path / 'band_stats.json'}", "overwrite=true"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err

    # a failed embed removes the output folders it created
    out = tmp_path / "new" / "pool"
    assert cli.main(["curate", "action=embed", "data=sample_nat", f"out={out}", "backbone=/no/such/run",
                     "progress=false"]) == 2
    assert "no such file or run directory" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
