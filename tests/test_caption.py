"""``pvlm-caption``: files, folders and globs; broken files skipped and counted, never fatal; batching;
JSON-lines output. The adapter is a real saved one whose base parts load from disk (conftest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlm.cli import main_caption, run
from vlm.data.tiny_datasets import sample_photos


def _photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo in sample_photos(start + n)[start:]:
        path = folder / f"{photo.name}.jpg"
        path.write_bytes(photo.jpeg)
        paths.append(path)
    return paths


def _truncated(path: Path) -> Path:
    jpeg = sample_photos(1)[0].jpeg
    path.write_bytes(jpeg[: len(jpeg) // 2])  # a download cut half way
    return path


def _run(tiny_adapter, tmp_path, *images, extra=()):
    out = tmp_path / "captions.jsonl"
    captions = run(
        "caption",
        [f"output_dir={tmp_path / 'run'}", "eval.progress=false", "--adapter", str(tiny_adapter),
         "--images", *map(str, images), "--output", str(out), *extra]
    )  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return captions, rows


def test_a_folder_with_two_broken_files_captions_every_good_image(tiny_adapter, tmp_path, capsys):
    """The reported failure: ``--images <folder>`` raised IsADirectoryError."""
    folder = tmp_path / "photos"
    good = _photos(folder, 4) + _photos(folder / "sub", 1, start=4)
    _truncated(folder / "cut.jpg")
    (folder / "garbage.png").write_bytes(b"this is no image at all")
    (folder / "notes.txt").write_text("not an image file: not picked up from a folder")
    main_caption([f"output_dir={tmp_path / 'run'}", "eval.progress=false", "--adapter", str(tiny_adapter),
                  "--images", str(folder), "--output", str(tmp_path / "c.jsonl")])  # fmt: skip
    printed = capsys.readouterr().out
    for path in good:
        assert f"{path}: " in printed
    assert "captioned 5 images; skipped 2 (corrupt_image: 1, truncated_image: 1)" in printed
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(map(str, good)) and all(
        isinstance(r["caption"], str) for r in rows
    )


def test_one_truncated_file_among_good_ones_is_skipped(tiny_adapter, tmp_path, capsys):
    """The reported failure: one truncated file raised ``OSError: image file is truncated`` and nothing
    was printed for the good images."""
    first, second = _photos(tmp_path / "a", 2)
    cut = _truncated(tmp_path / "a" / "cut.jpg")
    main_caption([f"output_dir={tmp_path / 'run'}", "eval.progress=false", "--adapter", str(tiny_adapter),
                  "--images", str(first), str(cut), str(second)])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{first}: " in printed and f"{second}: " in printed and f"{cut}: " not in printed
    assert "captioned 2 images; skipped 1 (truncated_image: 1)" in printed


def test_globs_missing_paths_and_batching(tiny_adapter, tmp_path):
    photos = _photos(tmp_path / "p", 5)
    one_by_one, rows = _run(tiny_adapter, tmp_path, tmp_path / "p" / "*.jpg", tmp_path / "gone.jpg",
                            tmp_path / "p" / "*.webp", extra=["--batch-size", "1"])  # fmt: skip
    batched, _ = _run(tiny_adapter, tmp_path, *photos, photos[0], extra=["--batch-size", "3"])  # a repeat counts once
    assert list(one_by_one) == [str(p) for p in sorted(photos)] and [r["image"] for r in rows] == list(one_by_one)
    assert batched == one_by_one  # greedy captions do not depend on the batch


def test_no_readable_image_is_an_error(tiny_adapter, tmp_path, capsys):
    _truncated(tmp_path / "cut.jpg")
    with pytest.raises(SystemExit) as exit_info:  # the CLI's one-line error, exit status 1
        main_caption([f"output_dir={tmp_path}", "--adapter", str(tiny_adapter), "--images", str(tmp_path)])
    assert exit_info.value.code == 1
    assert re.search(r"pvlm-caption: error: .*no readable image.*truncated_image: 1", capsys.readouterr().err)
    assert not (tmp_path / "captions.jsonl").exists()
