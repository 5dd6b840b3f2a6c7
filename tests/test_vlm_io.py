"""vlm.io: the one atomic-write helper. A destination is complete or untouched; no temporary survives an error."""

from __future__ import annotations

import os

import pytest

from vlm.io import TEMP_PREFIX, AtomicFile, atomic_directory, atomic_write


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_and_bytes_replace_the_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write(path, "first")
    atomic_write(path, b"\x00second")
    assert path.read_bytes() == b"\x00second" and _names(path.parent) == ["a.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # a normal file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError, match="cut"), AtomicFile(path, "w") as fh:
        fh.write("half of the new")
        raise RuntimeError("cut")
    assert path.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_commit_and_abort_by_hand(tmp_path):
    kept, dropped = AtomicFile(tmp_path / "kept.tar"), AtomicFile(tmp_path / "dropped.tar")
    kept.file.write(b"x")
    dropped.file.write(b"y")
    assert all(n.startswith(TEMP_PREFIX) for n in _names(tmp_path))  # hidden until committed
    kept.commit()
    dropped.abort()
    assert _names(tmp_path) == ["kept.tar"]


def test_atomic_directory_replaces_a_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
        assert not target.exists()  # nothing visible until the block ends
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert _names(target) == ["b"] and _names(tmp_path) == ["ckpt"]


def test_an_error_inside_atomic_directory_keeps_the_previous_version(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OSError, match="disk full"), atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
        raise OSError("disk full")
    assert _names(target) == ["a"] and _names(tmp_path) == ["ckpt"]


def test_a_failed_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    real, failed = os.replace, []

    def replace(src, dst):
        if str(dst) == str(target) and not failed:  # moving the new version in fails, after the old moved aside
            failed.append(src)
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    monkeypatch.undo()
    assert _names(target) == ["a"] and _names(tmp_path) == ["ckpt"]
