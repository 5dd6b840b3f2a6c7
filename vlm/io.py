"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Every writer in vlm (adapter and training checkpoints, shards, feature indexes, evaluation results,
stand-in backbones) goes through these helpers. `atomic_file_set` replaces a *set* of files that share
a directory with others (a shard set ``train-*.tar`` + its index beside ``val-*.tar``). The mechanism is always the same: write under a
hidden temporary name in the destination's own directory (so the rename never crosses a file
system), flush and ``fsync`` the data, ``os.replace`` it onto the final name, ``fsync`` the parent
directory so the rename itself is durable. Any error removes the temporary; a process killed
mid-write leaves only a ``.tmp_*`` entry that no reader looks at and that `remove_stale_temporaries`
deletes once its writer is gone.

An ``OSError`` from a write, ``fsync`` or rename (``ENOSPC``, ``EROFS``, ``EFBIG``, ``EDQUOT``...)
carries no file name of its own; these helpers re-raise it with the path they were writing, so the
message says what failed and where (`describe_os_error` formats it in one line).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "AtomicFile",
    "atomic_write",
    "atomic_directory",
    "atomic_file_set",
    "write_bytes",
    "remove_stale_temporaries",
    "describe_os_error",
    "TEMP_PREFIX",
]

TEMP_PREFIX = ".tmp_"  # temporaries are hidden and never match a reader's glob (step_*, *.tar, *.json)
_TEMP_PID = re.compile(rf"^{re.escape(TEMP_PREFIX)}.+_(\d+)_[0-9a-f]{{8}}$")


def _temp_beside(final: Path) -> Path:
    """A fresh hidden name in ``final``'s directory (created with the usual permissions, not mkstemp's 0600)."""
    return final.with_name(f"{TEMP_PREFIX}{final.name}_{os.getpid()}_{secrets.token_hex(4)}")


def _named(err: OSError, path: str | Path) -> OSError:
    """``err`` with ``path`` as its file name when it has an errno but no name (write/fsync errors)."""
    if err.errno is None or err.filename is not None:
        return err
    named = OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))  # the errno's subclass
    named.__cause__ = err
    return named


def describe_os_error(err: OSError) -> str:
    """One line: ``<path>: <what> (<ERRNO>)``, e.g. ``/run/x.pt: No space left on device (ENOSPC)``."""
    code = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    what = err.strerror or str(err)
    where = f"{err.filename}: " if err.filename is not None else ""
    return f"{where}{what}{f' ({code})' if code else ''}"


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` on `commit` and vanishes on `abort`.

    As a context manager it yields the open file, commits on success and aborts on any exception.
    Used directly (``handle.file``, ``commit()``, ``abort()``) it serves writers that hand a file to a
    library and learn later whether it completed (webdataset's ``ShardWriter``).
    """

    def __init__(self, path: str | Path, mode: str = "wb", encoding: str | None = None) -> None:
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes a new file: mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.tmp = _temp_beside(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as err:
            raise _named(err, self.path) from err
        self.file: IO[Any] = os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None)

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.abort()
            raise _named(err, self.path) from err
        except BaseException:
            self.abort()
            raise
        _fsync_directory(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()  # flushing the buffer can fail again (a full disk): the temporary goes anyway
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError) and _named(exc, self.path) is not exc:
            raise _named(exc, self.path) from exc


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    if isinstance(data, str):
        with AtomicFile(path, "w", encoding="utf-8") as fh:
            fh.write(data)
    else:
        with AtomicFile(path, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (inside an `atomic_directory`); an OSError names ``path``.

    Serialising to bytes first and writing them here (rather than letting a C++ or Rust writer open
    the file) is what turns a full disk into ``ENOSPC`` on a named file instead of an opaque
    ``basic_ios::clear`` error."""
    try:
        with open(path, "xb") as fh:
            fh.write(data)
    except OSError as err:
        raise _named(err, path) from err


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` when the block succeeds.

    Every file in it is fsynced before the rename. An existing ``path`` is moved aside first
    (``os.replace`` cannot overwrite a non-empty directory) and deleted after; on any error the
    temporary is deleted and ``path`` is left as it was.
    """
    final = Path(path)
    tmp, old = _temp_beside(final), None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise _named(err, tmp) from err
    current = tmp
    try:
        yield tmp
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                current = item
                with open(item, "rb") as fh:
                    os.fsync(fh.fileno())
        current = final
        if final.exists():
            old = _temp_beside(final)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException as err:
        if old is not None and not final.exists():
            os.replace(old, final)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and _named(err, current) is not err:
            raise _named(err, current) from err
        raise
    _fsync_directory(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the ``.tmp_*`` entries in ``directory`` whose writing process is gone (its pid is in the
    name; a pid still alive here keeps its temporary). Returns what was removed."""
    removed = []
    folder = Path(directory)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_PID.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextmanager
def atomic_file_set(
    directory: str | Path, replaces: Callable[[], Iterable[Path]], index: str | None = None
) -> Iterator[Path]:
    """Yield an empty hidden staging directory inside ``directory``; when the block succeeds, the
    files ``replaces()`` names (the old set, listed at commit time) leave ``directory`` and every file
    written to the staging directory takes their place, so the old and the new set never mix.

    ``index`` names the file describing the set: the old one is removed before any other file moves
    and the new one moved in after all the others, so an index on disk never describes files that are
    not there. A reader listing the directory during the swap sees a subset of one set, never a mix.
    On any error the staging directory is deleted and the old set is put back.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    staging = _temp_beside(folder / "set")
    staging.mkdir()
    aside = staging / (TEMP_PREFIX + "old")
    moved_aside: list[Path] = []
    moved_in: list[Path] = []
    try:
        yield staging
        new = sorted(p for p in staging.iterdir() if p != aside)
        if any(not p.is_file() for p in new):
            raise ValueError(f"atomic_file_set stages plain files only, got {[p.name for p in new if not p.is_file()]}")
        for item in new:
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
        aside.mkdir()
        clashing = {folder / p.name for p in new if (folder / p.name).exists()}  # never overwritten unsaved
        old = sorted({Path(p) for p in replaces()} | clashing, key=lambda p: (p.name != index, p.name))
        for path in old:
            if path.parent.resolve() != folder.resolve():
                raise ValueError(f"atomic_file_set: {path} is not in {folder}")
            if path.exists():
                os.replace(path, aside / path.name)
                moved_aside.append(path)
        for item in sorted(new, key=lambda p: p.name == index):  # the index last
            os.replace(item, folder / item.name)
            moved_in.append(folder / item.name)
    except BaseException:
        for path in moved_in:
            path.unlink(missing_ok=True)
        for path in moved_aside:
            os.replace(aside / path.name, path)  # put the previous set back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(folder)
    shutil.rmtree(staging, ignore_errors=True)
