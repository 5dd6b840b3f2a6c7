"""Shard writing: round trip, whole-set replacement, empty results, folder + CSV/JSONL and img2dataset sources,
shard specs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.data import (
    DataConfig,
    EmptyShardSet,
    resolve_shards,
    shards_from_folder,
    shards_from_img2dataset,
    write_samples,
)
from vlm.data.reader import CaptionLoader

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(n: int):
    for i in range(n):
        yield {"__key__": f"s{i:03d}", "png": _png(i), "json": {"captions": [f"caption {i}", f"other {i}"], "i": i}}


def _read_all(spec, **config):
    loader = CaptionLoader(
        spec, DataConfig(batch_size=4, image_size=16, preprocess="plain", **config), train=False, keep_pixels=True
    )
    out = {}
    for batch in loader:
        for key, refs, meta, pixels in zip(batch.sample_keys, batch.references, batch.meta, batch.pixels):
            out[key] = (refs, meta, pixels)
    return out, loader


def test_round_trip_write_then_read_gives_the_same_samples(tmp_path):
    summary = write_samples(_samples(17), tmp_path, prefix="rt", samples_per_shard=5)
    assert summary.num_samples == 17 and summary.samples_per_shard == [5, 5, 5, 2]
    assert [p.rsplit("/", 1)[1] for p in summary.shards] == [f"rt-{i:06d}.tar" for i in range(4)]
    index = json.loads((tmp_path / "rt-index.json").read_text())
    assert index["num_samples"] == 17 and index["shards"] == summary.shards
    got, loader = _read_all(summary.pattern)
    assert sorted(got) == [f"s{i:03d}" for i in range(17)] and not loader.bad_samples
    for i in range(17):
        refs, meta, pixels = got[f"s{i:03d}"]
        assert refs == [f"caption {i}", f"other {i}"] and meta["i"] == i
        assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(_png(i)))))


def test_same_samples_give_identical_shard_bytes(tmp_path):
    a = write_samples(_samples(6), tmp_path / "a", samples_per_shard=4)
    b = write_samples(_samples(6), tmp_path / "b", samples_per_shard=4)
    for x, y in zip(a.shards, b.shards):
        assert Path(x).read_bytes() == Path(y).read_bytes()


def test_a_failed_write_keeps_the_previous_set_and_publishes_nothing(tmp_path):
    before = write_samples(_samples(3), tmp_path, samples_per_shard=1)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken():
        yield from _samples(7)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_samples(broken(), tmp_path, samples_per_shard=5)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no new shard, no .tmp left
    assert len(before.shards) == 3


def _shard_set(folder: Path, prefix: str) -> tuple[list[str], dict]:
    """The shard files of ``prefix`` on disk and the index beside them."""
    on_disk = sorted(p.name for p in folder.glob(f"{prefix}-*.tar"))
    return on_disk, json.loads((folder / f"{prefix}-index.json").read_text())


def test_a_new_run_replaces_the_whole_previous_set(tmp_path):
    write_samples(_samples(5), tmp_path, prefix="train", samples_per_shard=1)  # train-000000..4
    write_samples(_samples(4), tmp_path, prefix="train-big", samples_per_shard=2)  # another set, same folder
    summary = write_samples(_samples(2), tmp_path, prefix="train", samples_per_shard=10)
    on_disk, index = _shard_set(tmp_path, "train")
    assert on_disk == ["train-000000.tar", "train-big-000000.tar", "train-big-000001.tar"]
    assert index["shards"] == summary.shards == [str(tmp_path / "train-000000.tar")]
    assert index["num_samples"] == 2 and index["shard_bytes"] == [(tmp_path / "train-000000.tar").stat().st_size]
    got, _ = _read_all(str(tmp_path / "train-0*.tar"))
    assert sorted(got) == ["s000", "s001"]  # nothing of the earlier run's five samples
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_empty_result_is_an_error_and_leaves_the_previous_set(tmp_path):
    write_samples(_samples(3), tmp_path, prefix="train", samples_per_shard=1)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(EmptyShardSet, match=r"no sample to write.*missing_image.: 4"):
        write_samples(iter([]), tmp_path, prefix="train", skipped={"missing_image": 4})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def _folder_run(tmp_path: Path, images: Path, samples_per_shard: int) -> None:
    from vlm.cli import run  # errors raise as themselves (the console script turns them into one line)

    run(
        "make-shards",
        ["--config", str(TINY / "make_shards.yaml"), f"output_dir={tmp_path / 'run'}", "shards.source=folder",
         f"shards.input_dir={images}", f"shards.captions_file={tmp_path / 'captions.csv'}",
         f"shards.samples_per_shard={samples_per_shard}"]
    )  # fmt: skip


def test_make_shards_with_a_typo_in_input_dir_fails_and_keeps_the_previous_set(tmp_path):
    """The reported corruption: a typo'd input_dir printed "wrote 0 samples", exited 0, replaced
    train-000000.tar with an empty tar and left train-000001..4.tar of the earlier run beside it."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"im{i}.png").write_bytes(_png(i))
    (tmp_path / "captions.csv").write_text("file,caption\n" + "".join(f"im{i}.png,caption {i}\n" for i in range(5)))
    _folder_run(tmp_path, images, samples_per_shard=1)
    data = tmp_path / "run" / "data"
    old = {p.name: p.read_bytes() for p in data.iterdir()}
    assert len([n for n in old if n.endswith(".tar")]) == 5
    with pytest.raises(FileNotFoundError, match="imagse"):
        _folder_run(tmp_path, tmp_path / "imagse", samples_per_shard=1)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == old
    # a folder that exists but holds none of the named images: an empty result, an error too
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"no sample to write.*missing_image.: 5"):
        _folder_run(tmp_path, tmp_path / "other", samples_per_shard=1)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == old
    # a good run with fewer, larger shards: exactly its shards remain and the index lists them
    _folder_run(tmp_path, images, samples_per_shard=3)
    on_disk, index = _shard_set(data, "train")
    assert on_disk == ["train-000000.tar", "train-000001.tar"] and index["samples_per_shard"] == [3, 2]
    assert [Path(p).name for p in index["shards"]] == on_disk


def test_make_shards_exits_non_zero_on_a_missing_captions_file(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "vlm.cli", "make-shards", "--config", str(TINY / "make_shards.yaml"),
         f"output_dir={tmp_path}", "shards.source=folder", f"shards.input_dir={tmp_path}",
         f"shards.captions_file={tmp_path / 'nope.csv'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "nope.csv" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").glob("*.tar"))


def test_bad_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key"):
        write_samples([{"__key__": "a", "txt": "x"}, {"__key__": "a", "txt": "y"}], tmp_path)
    with pytest.raises(ValueError, match="__key__"):
        write_samples([{"txt": "x"}], tmp_path / "b")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_with_caption_table(tmp_path, fmt):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(_png(1))
    (images / "sub" / "b.v2.png").write_bytes(_png(2))  # a dot in the name: the key must lose it
    (images / "empty.png").write_bytes(b"")
    rows = [
        ("a.png", "first a"),
        ("sub/b.v2.png", "only b"),
        ("a.png", "second a"),
        ("gone.png", "x"),
        ("empty.png", "y"),
    ]
    if fmt == "csv":
        table = tmp_path / "captions.csv"
        table.write_text("file,caption\n" + "\n".join(f'{f},"{c}"' for f, c in rows) + "\n")
    else:
        table = tmp_path / "captions.jsonl"
        table.write_text("\n".join(json.dumps({"image": f, "caption": c}) for f, c in rows) + "\n")
    summary = shards_from_folder(images, table, tmp_path / "out", samples_per_shard=10)
    assert summary.num_samples == 2 and summary.skipped == {"missing_image": 1, "empty_image": 1}
    got, _ = _read_all(summary.pattern)
    assert got["a"][0] == ["first a", "second a"] and got["sub_b_v2"][0] == ["only b"]


def test_caption_table_needs_known_columns_and_a_usable_row(tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("name,text_of\nx.png,hi\n")
    with pytest.raises(ValueError, match="image column"):
        shards_from_folder(tmp_path, table, tmp_path / "out")
    table.write_text("file,caption\nx.png,\ny.png,  \n")
    with pytest.raises(ValueError, match="no usable row"):
        shards_from_folder(tmp_path, table, tmp_path / "out")


def test_img2dataset_layout(tmp_path):
    src = tmp_path / "downloaded" / "00000"
    src.mkdir(parents=True)
    (src / "000000000.jpg").write_bytes(_png(0))
    (src / "000000000.txt").write_text("a photo\n")
    (src / "000000000.json").write_text(json.dumps({"caption": "a photo", "url": "http://x", "status": "success"}))
    (src / "000000001.jpg").write_bytes(_png(1))
    (src / "000000001.json").write_text(json.dumps({"captions": ["one", "two"]}))
    (src / "000000002.jpg").write_bytes(_png(2))  # no caption at all
    (src / "000000003.jpg").write_bytes(_png(3))
    (src / "000000003.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    summary = shards_from_img2dataset(tmp_path / "downloaded", tmp_path / "out")
    assert summary.num_samples == 2
    assert summary.skipped == {"missing_caption": 1, "bad_caption_encoding": 1}
    got, _ = _read_all(summary.pattern)
    assert got["00000_000000000"][0] == ["a photo"] and got["00000_000000000"][1]["url"] == "http://x"
    assert got["00000_000000001"][0] == ["one", "two"]


def test_resolve_shards_forms(tmp_path):
    summary = write_samples(_samples(6), tmp_path, prefix="p", samples_per_shard=2)
    expected = summary.shards
    assert resolve_shards(str(tmp_path / "p-{000000..000002}.tar")) == expected
    assert resolve_shards(str(tmp_path / "p-*.tar")) == expected
    assert resolve_shards(str(tmp_path)) == expected
    assert resolve_shards(summary.pattern) == expected
    assert resolve_shards(expected[:1]) == expected[:1]
    with pytest.raises(ValueError, match="no shards match"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def test_a_failure_while_swapping_sets_puts_the_previous_set_back(tmp_path, monkeypatch):
    import os

    write_samples(_samples(3), tmp_path, prefix="train", samples_per_shard=1)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, moved = os.replace, []

    def replace(src, dst):
        if Path(dst).parent == tmp_path and Path(src).parent != tmp_path:  # a new file moving in
            moved.append(dst)
            if len(moved) == 2:  # the second new shard: the old set is aside, one new shard is in
                raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        write_samples(_samples(4), tmp_path, prefix="train", samples_per_shard=2)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # exactly the old set, no temporary


def test_make_shards_help_lists_the_sources_and_their_fields(capsys):
    from vlm.cli import main_make_shards

    with pytest.raises(SystemExit):
        main_make_shards(["--help"])
    out = capsys.readouterr().out
    assert "shards.source: {synthetic,folder,coco,karpathy,nocaps,img2dataset} = 'synthetic'" in out
    for field in ("shards.annotations_file: str = ''  -- coco: captions_*.json", "shards.split: str = ''  -- karpathy"):
        assert field in out
