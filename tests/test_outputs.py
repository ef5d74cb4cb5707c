"""geodino.outputs: no clobbering, atomic writes, one-line disk-full / read-only / permission errors, no empty
folders after a failure (issue #14 items 2 and 9)."""

from __future__ import annotations

import errno
import os

import pytest

from geodino import outputs
from geodino.errors import GeodinoError
from geodino.outputs import (
    OutputWriteError,
    atomic_output,
    atomic_write_bytes,
    atomic_write_text,
    check_outputs,
    output_dir,
)


def test_check_outputs_refuses_inputs_collisions_folders_and_existing_files(tmp_path):
    inp = tmp_path / "scene.tif"
    inp.write_bytes(b"x")
    with pytest.raises(GeodinoError, match="would overwrite the input"):
        check_outputs([tmp_path / "a.png", inp], [inp], overwrite=True)
    link = tmp_path / "link.tif"
    link.symlink_to(inp)
    with pytest.raises(GeodinoError, match="would overwrite the input"):
        check_outputs([link], [inp], overwrite=True)
    hard = tmp_path / "hard.tif"
    os.link(inp, hard)
    with pytest.raises(GeodinoError, match="would overwrite the input"):
        check_outputs([hard], [inp], overwrite=True)
    with pytest.raises(GeodinoError, match="twice"):
        check_outputs([tmp_path / "o.json", tmp_path / "sub" / ".." / "o.json"])
    with pytest.raises(GeodinoError, match="existing folder"):
        check_outputs([tmp_path], overwrite=True)
    with pytest.raises(GeodinoError) as e:
        check_outputs([inp], [])
    assert str(e.value) == f"output {inp} exists; overwrite=true replaces it"
    assert check_outputs([inp], [], overwrite=True) == [inp]
    assert check_outputs([tmp_path / "new.tif"], [inp, None]) == [tmp_path / "new.tif"]


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "a.json"
    atomic_write_text(path, "one")
    atomic_write_bytes(path, b"two")
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_disk_full_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):  # the first bytes land, then the disk is full
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    target = tmp_path / "big.bin"
    with pytest.raises(OutputWriteError) as e:
        atomic_write_bytes(target, b"x" * 3_000_000)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {target} (needs ~3 MB") and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, text", [(errno.EROFS, "is on a read-only file system"),
                                        (errno.EACCES, "permission denied writing"),
                                        (errno.EDQUOT, "disk quota exceeded writing")])
def test_read_only_permission_and_quota_errors_are_one_line(tmp_path, code, text):
    target = tmp_path / "x.json"
    with pytest.raises(OutputWriteError, match=text) as e, atomic_output(target) as tmp:
        tmp.write_text("partial")
        raise OSError(code, os.strerror(code))
    assert str(target) in str(e.value) and list(tmp_path.iterdir()) == []


def test_a_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / "sub" / "x.txt"
    if os.geteuid() == 0:  # root writes through chmod: stand in the file system's answer
        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(outputs.Path, "mkdir", refuse)
        expect = "read-only file system"
    else:
        folder.chmod(0o555)
        expect = "permission denied writing"
    try:
        with pytest.raises(OutputWriteError, match=expect):
            atomic_write_text(target, "x")
        with pytest.raises(OutputWriteError, match=expect), output_dir(folder / "run"):
            pass
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_output_dir_removes_only_what_a_failed_command_created(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    with pytest.raises(ValueError), output_dir(keep / "a" / "b" / "run") as run:
        (run / "config.yaml").write_text("x")
        raise ValueError("bad input")
    assert list(keep.iterdir()) == []
    with pytest.raises(ValueError), output_dir(keep):
        raise ValueError("bad input")
    assert keep.is_dir()
    with output_dir(keep / "ok") as run:
        (run / "results.json").write_text("{}")
    assert (keep / "ok" / "results.json").is_file()


def test_the_cli_turns_an_unwrapped_disk_full_into_one_line(tmp_path, monkeypatch, capsys):
    from geodino import cli

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints" / "x.pt"))

    monkeypatch.setattr(cli, "_handlers", lambda: {"export": full})
    assert cli.main(["export", "checkpoint=x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: geodino export: no space left on device writing {tmp_path / 'run' / 'checkpoints' / 'x.pt'}")
