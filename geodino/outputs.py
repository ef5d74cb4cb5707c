"""Writing a command's output files safely: never over an input, never over another output of the same command,
never over an existing file unless ``overwrite=true``; atomically; and with one clear line when the disk is full,
read-only or not writable.

- `check_outputs(outputs, inputs, overwrite, what)` refuses, before any work is done, an output that is an input
  (symlinks resolved, hard links compared), collides with another output, is an existing folder, or exists
  (unless ``overwrite``);
- `atomic_output(path)` yields a temporary name in the same folder; on success the file is fsynced and renamed
  over ``path``, on failure the partial file is removed. `atomic_write_bytes` / `atomic_write_text` use it;
- `write_errors(path, needs_bytes)` turns the OSErrors of a full disk (ENOSPC, EDQUOT), a read-only file system
  (EROFS) and a refused permission (EACCES, EPERM) into one-line `OutputWriteError`s naming the path;
- `output_dir(path)` creates a command's output folder and, when the command fails, removes the folders it
  created, so a failed command leaves no empty run folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from geodino.errors import GeodinoError

__all__ = ["OutputWriteError", "atomic_output", "atomic_write_bytes", "atomic_write_text", "check_outputs",
           "output_dir", "write_error", "write_errors", "write_new"]

_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}
# Libraries that do their own I/O (GDAL through rasterio) raise their own exception types; their messages carry
# the C library's wording.
_MESSAGES = (("no space left on device", errno.ENOSPC), ("free disk space available", errno.ENOSPC),
             ("disk quota exceeded", errno.EDQUOT), ("read-only file system", errno.EROFS),
             ("permission denied", errno.EACCES))


class OutputWriteError(GeodinoError):
    """An output could not be written: disk full, read-only file system, permission denied."""


def _key(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same_file(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                  what: str = "output") -> list[Path]:
    """Refuse (one-line GeodinoError) any output that is an input, collides with another output, is a folder, or
    exists while ``overwrite`` is false; returns the outputs as Paths (user-expanded). Call it before the work."""
    outs = [Path(str(p)).expanduser() for p in outputs]
    ins = [Path(str(p)).expanduser() for p in inputs if p is not None and str(p) != ""]
    seen: dict[Path, Path] = {}
    for out in outs:
        for inp in ins:
            if _same_file(out, inp):
                raise GeodinoError(f"{what} {out} would overwrite the input {inp}; choose another output path")
        key = _key(out)
        if key in seen:
            raise GeodinoError(f"{what} writes {out} twice (also as {seen[key]}); choose another output path")
        seen[key] = out
        if out.is_dir():
            raise GeodinoError(f"{what} {out} is an existing folder, not a file; choose another output path")
        if out.exists() and not overwrite:
            raise GeodinoError(f"{what} {out} exists; overwrite=true replaces it")
    return outs


def _free_bytes(path: Path) -> int | None:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f}" if n >= 10e6 else f"{n / 1e6:.2g}"


def _errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    if isinstance(e, GeodinoError):
        return None
    msg = str(e).lower()
    return next((code for text, code in _MESSAGES if text in msg), None)


def write_error(path: str | Path, e: BaseException, needs_bytes: int | None = None) -> OutputWriteError | None:
    """The one-line error for a failed write of ``path`` (None when ``e`` is not a full / read-only / denied one)."""
    code = _errno_of(e)
    path = Path(path)
    if code in _FULL:
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        needs = []
        if needs_bytes:
            needs.append(f"needs ~{_mb(needs_bytes)} MB")
        free = _free_bytes(path) if code == errno.ENOSPC else None
        if free is not None:
            needs.append(f"{_mb(free)} MB free")
        return OutputWriteError(f"{what} writing {path}" + (f" ({', '.join(needs)})" if needs else "")
                                + "; free some space or choose another output folder")
    if code in _READ_ONLY:
        return OutputWriteError(f"{path} is on a read-only file system; choose another output folder")
    if code in _DENIED:
        return OutputWriteError(f"permission denied writing {path}; choose a folder you can write to")
    return None


@contextlib.contextmanager
def write_errors(path: str | Path, needs_bytes: int | None = None) -> Iterator[None]:
    """Re-raise a full-disk / read-only / permission error raised in the body as one `OutputWriteError` line."""
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as e:
        err = write_error(path, e, needs_bytes)
        if err is None:
            raise
        raise err from e


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    # the original suffix last, so libraries that pick a format by the name (GDAL, numpy) see it
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | Path, needs_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body succeeds the file there is fsynced and renamed to
    ``path`` (replacing it), when it fails the temporary file is removed and full-disk / read-only / permission
    errors become one line (`write_errors`)."""
    path = Path(path).expanduser()
    tmp = _temp_name(path)
    with write_errors(path, needs_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)


def write_new(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to a new file ``path`` (e.g. the name `atomic_output` yields), all of it."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to open()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path).expanduser()
    with atomic_output(path, needs_bytes=len(data)) as tmp:
        write_new(tmp, data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def close_file_logs(folder: Path) -> None:
    """Detach the `geodino` logger's file handlers that write under ``folder`` (before the folder is removed)."""
    log = logging.getLogger("geodino")
    root = _key(folder)
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler) and root in _key(Path(h.baseFilename)).parents:
            log.removeHandler(h)
            h.close()


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """Create the output folder ``path`` (and its missing parents) for the body; if the body raises, remove the
    folders this call created, with what the failed command wrote into them. A folder that existed is kept."""
    path = Path(path).expanduser()
    created: list[Path] = []
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    with write_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            close_file_logs(created[-1])
            shutil.rmtree(created[0], ignore_errors=True)
            for parent in created[1:]:  # the parents this call made, while nothing else went into them
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise
