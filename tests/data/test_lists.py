"""Item lists (geodino.data.lists): chip lists and file lists."""

from __future__ import annotations

import pytest

from geodino.data import lists


def test_chip_list_round_trip_and_errors(tmp_path):
    p = lists.write_chip_list(tmp_path / "c.txt", [5, 1, 9], {"seed": 3, "chip_size": 64, "bands": ["B02", "B03"]})
    chips, meta = lists.read_chip_list(p)
    assert chips.tolist() == [5, 1, 9]
    assert meta["seed"] == 3 and meta["chip_size"] == 64 and meta["bands"] == ["B02", "B03"]
    (tmp_path / "bad.txt").write_text("# seed: 1\n4\nnope\n")
    with pytest.raises(Exception, match="bad.txt:3: 'nope' is not a chip index"):
        lists.read_chip_list(tmp_path / "bad.txt")
