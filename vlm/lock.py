"""One run per directory: an exclusive ``flock`` on ``<output_dir>/.pvlm.lock`` for a whole command.

The lock is the kernel's (``fcntl.flock`` on an open file), so it is released when the process
exits for any reason, a crash or ``kill -9`` included: there is never a stale lock to delete. The
holder writes ``<pid> <command>`` into the file so that a refused command can say who holds it.
Under torchrun only global rank 0 takes it (the other ranks of the same job share the directory);
a refused rank 0 exits and torchrun stops its peers.

    with run_lock(cfg.out, "train"):     # DirectoryLocked at once when another command holds it
        ...
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "DirectoryLocked", "run_lock", "try_lock"]

LOCK_NAME = ".pvlm.lock"


class DirectoryLocked(RuntimeError):
    """Another process holds the directory's lock; ``pid`` and ``command`` say which (None if unknown)."""

    def __init__(self, directory: Path, pid: int | None, command: str | None) -> None:
        self.directory, self.pid, self.command = directory, pid, command
        who = f"pid {pid}" if pid is not None else "another process"
        what = f" ({command})" if command else ""
        super().__init__(
            f"{directory} is in use by {who}{what}: one command per output_dir at a time; wait for it to finish, "
            "or use another output_dir"
        )


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def try_lock(directory: str | Path, command: str) -> tuple[int | None, DirectoryLocked | None]:
    """Take the lock without waiting: ``(fd, None)`` when taken (close ``fd`` to release it), or
    ``(None, DirectoryLocked)`` naming the holder. Ranks other than 0 get ``(None, None)``."""
    if not _is_rank_zero():
        return None, None
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, DirectoryLocked(folder, *_holder(path))
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {command}\n".encode())
    return fd, None


@contextmanager
def run_lock(directory: str | Path, command: str) -> Iterator[None]:
    """Hold the directory's lock for the block; raise `DirectoryLocked` at once if another holds it."""
    fd, refused = try_lock(directory, command)
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the file releases the flock


def _holder(path: Path) -> tuple[int | None, str | None]:
    try:
        pid, _, command = path.read_text(encoding="utf-8", errors="replace").strip().partition(" ")
        return int(pid), command or None
    except (OSError, ValueError):
        return None, None
