"""Integrity of checkpoint files: a sha256 and a size per file, recorded when written, checked when read.

Every checkpoint format of vlm (adapters, training checkpoints, and any sharded format beside them)
keeps a record ``{file name: {"sha256": hex, "size": bytes}}`` in its own JSON (``manifest.json``,
``state.json``) and uses these functions, so a flipped byte, a cut file or a file swapped in from
elsewhere is refused before anything is parsed:

    record = {name: digest(data)}                        # when writing (the bytes about to be written)
    data = read_verified(directory, name, record[name])  # when loading: the bytes that were checked

`read_verified` reads each file once and returns exactly the bytes it verified (no second read a
writer could change in between). `regular_file_inside` is the rule for names that come from a file
(a manifest, a pointer): a plain file name, a regular file, no symlink, resolving inside the
directory; it is applied before any byte is read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["IntegrityError", "digest", "read_verified", "regular_file_inside", "check_record"]


class IntegrityError(ValueError):
    """A file does not match its record, is missing, or is not a regular file inside its directory."""


def digest(data: bytes) -> dict[str, int | str]:
    """The record of one file's content: ``{"sha256": <hex>, "size": <bytes>}``."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def check_record(record: object, where: str) -> dict[str, dict]:
    """``record`` as read from JSON, checked to be ``{name: {"sha256": 64 hex chars, "size": int >= 0}}``."""
    if not isinstance(record, dict):
        raise IntegrityError(f"{where}: the file record must be a mapping of file names, got {type(record).__name__}")
    for name, entry in record.items():
        ok = (
            isinstance(entry, dict)
            and set(entry) == {"sha256", "size"}
            and isinstance(entry["sha256"], str)
            and len(entry["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in entry["sha256"])
            and isinstance(entry["size"], int)
            and not isinstance(entry["size"], bool)
            and entry["size"] >= 0
        )
        if not ok:
            raise IntegrityError(f"{where}: the record of {name!r} must be {{sha256: <64 hex>, size: <bytes>}}")
    return record


def regular_file_inside(directory: str | Path, name: str) -> Path:
    """``directory / name`` after checking that ``name`` is a plain file name and the entry is a regular
    file (not a symlink, device or directory) whose resolved path lies inside ``directory``."""
    folder = Path(directory)
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise IntegrityError(f"{folder}: {name!r} is not a plain file name")
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing") from None
    if stat.S_ISLNK(info.st_mode):
        raise IntegrityError(f"{path} is a symlink ({os.readlink(path)!r}); checkpoint files must be regular files")
    if not stat.S_ISREG(info.st_mode):
        raise IntegrityError(f"{path} is not a regular file")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise IntegrityError(f"{path} resolves outside {folder}")
    return path


def read_verified(directory: str | Path, name: str, expected: dict | None, max_size: int | None = None) -> bytes:
    """The bytes of ``directory / name`` (a `regular_file_inside`) after checking them against
    ``expected`` (size first, then sha256). ``expected=None`` (a checkpoint written before records
    existed) checks only the file rule and ``max_size``."""
    path = regular_file_inside(directory, name)
    size = path.stat().st_size
    limit = expected["size"] if expected is not None else max_size
    if limit is not None and size > limit:
        raise IntegrityError(f"{path} is {size} bytes, more than the {limit} its record allows")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1 if limit is not None else -1)
    if expected is None:
        return data
    if len(data) != expected["size"]:
        raise IntegrityError(f"{path} is {len(data)} bytes, its record says {expected['size']}: cut or replaced")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise IntegrityError(f"{path}: sha256 differs from its record: the file is corrupt or was replaced")
    return data
