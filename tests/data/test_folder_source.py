"""Photo folders: nested files, optional file list, unreadable and tiny images skipped and counted."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from geodino.data.sources.folder import FolderSource
from geodino.errors import DataError


def _img(path, size, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_nested_folder_with_bad_files_skipped_and_named(tmp_path, caplog):
    _img(tmp_path / "a" / "one.jpg", (64, 48), 10)
    _img(tmp_path / "a" / "b" / "two.png", (40, 40), 200)
    _img(tmp_path / "tiny.png", (8, 8), 50)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    logger = logging.getLogger("geodino")  # geodino's logger may not propagate (see geodino.runs)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="geodino"):
            src = FolderSource([tmp_path], min_size=32)
    finally:
        logger.removeHandler(caplog.handler)
    assert sorted(p.name for p in src.files) == ["one.jpg", "two.png"]
    assert set(src.skipped) == {str(tmp_path / "tiny.png"), str(tmp_path / "broken.jpg")}
    assert "too small" in src.skipped[str(tmp_path / "tiny.png")]
    assert "unreadable" in src.skipped[str(tmp_path / "broken.jpg")]
    assert "broken.jpg" in caplog.text and "tiny.png" in caplog.text
    x = src[[p.name for p in src.files].index("one.jpg")]
    assert x.shape == (3, 48, 64) and x.dtype.is_floating_point
    assert float(x.max()) == pytest.approx(10 / 255, abs=1e-6)
    assert len(FolderSource([tmp_path], length=10)) == 10


def test_file_list_and_empty_folder_errors(tmp_path):
    _img(tmp_path / "x" / "keep.jpg", (40, 40), 1)
    _img(tmp_path / "x" / "drop.jpg", (40, 40), 2)
    lst = tmp_path / "list.txt"
    lst.write_text("# curated\nx/keep.jpg\n")
    src = FolderSource([tmp_path], file_list=lst)
    assert [p.name for p in src.files] == ["keep.jpg"]
    with pytest.raises(DataError, match="does not exist"):
        FolderSource([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        FolderSource([tmp_path / "empty"])
    _img(tmp_path / "small" / "s.png", (4, 4), 1)
    with pytest.raises(DataError, match="smaller than 32"):
        FolderSource([tmp_path / "small"])
