"""Messy web data: every bad item of the reliability issue is skipped and counted (or converted and
counted), nothing crashes, and a training run over all of it finishes and reports what it skipped.
The shard reader is also fuzzed with random and mutated bytes for a bounded number of cases."""

from __future__ import annotations

import io
import logging
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm.data import DataConfig, write_samples
from vlm.data.reader import CaptionLoader

SIZE = 32


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (8-bit gray) with one tiny IDAT: a decompression bomb's
    header without allocating it here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _config(**kw) -> DataConfig:
    base = dict(batch_size=4, image_size=SIZE, preprocess="plain", sample_shuffle=0, shard_shuffle=False)
    return DataConfig(**{**base, **kw})


GOOD = {"captions": ["a red circle"]}


def _messy_samples() -> tuple[list[dict], Counter, Counter, set[str]]:
    """(samples, expected skip counts, expected conversions, keys that must survive)."""
    png = _encode(_rgb(1))
    jpeg = _encode(_rgb(2), "JPEG")
    bad = {
        "zero_bytes": ({"png": b"", "json": GOOD}, "empty_image"),
        "corrupt": ({"png": b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "json": GOOD}, "corrupt_image"),
        "not_image": ({"jpg": b"<html>404 not found</html>", "json": GOOD}, "corrupt_image"),
        "truncated_png": ({"png": png[: len(png) // 2], "json": GOOD}, "truncated_image"),
        "truncated_jpeg": ({"jpg": jpeg[: len(jpeg) // 3], "json": GOOD}, "truncated_image"),
        "bomb_20000": ({"png": _png_header_only(20_000, 20_000), "json": GOOD}, "decompression_bomb"),
        "empty_caption": ({"png": png, "json": {"captions": [""]}}, "empty_caption"),
        "whitespace_caption": ({"png": png, "txt": b" \t\n \r\n"}, "empty_caption"),
        "non_utf8_caption": ({"png": png, "txt": b"\xff\xfe\xc3\x28 caf\xe9"}, "bad_caption_encoding"),
        "non_utf8_json": ({"png": png, "json": b'{"caption": "\xe9"}'}, "bad_caption_encoding"),
        "no_caption": ({"png": png}, "missing_caption"),
        "no_image": ({"json": GOOD}, "missing_image"),
        "only_unexpected_member": ({"exe": b"MZ\x90\x00", "json": GOOD}, "missing_image"),
    }
    gray16 = Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16))
    odd = {
        "gray": (_encode(_rgb(3).convert("L")), "L"),
        "rgba": (_encode(_rgb(4).convert("RGBA")), "RGBA"),
        "palette": (_encode(_rgb(5).convert("P", palette=Image.ADAPTIVE)), "P"),
        "cmyk": (_encode(_rgb(6).convert("CMYK"), "JPEG"), "CMYK"),
        "gray16": (_encode(gray16), "I;16"),
    }
    good = {
        "one_pixel": {"png": _encode(_rgb(7, size=1)), "json": GOOD},
        "long_caption": {"png": png, "txt": ("word " * 20_000).encode()},  # 100k characters
        "extra_member": {"png": png, "json": GOOD, "weird": b"\x00\x01", "exe": b"MZ"},
        "good_a": {"png": _encode(_rgb(8)), "json": GOOD},
        "good_b": {"jpg": _encode(_rgb(9), "JPEG"), "json": {"caption": "a blue square"}},
    }
    samples = [{"__key__": k, **v} for k, (v, _) in bad.items()]
    samples += [
        {"__key__": k, ("jpg" if mode == "CMYK" else "png"): data, "json": GOOD} for k, (data, mode) in odd.items()
    ]
    samples += [{"__key__": k, **v} for k, v in good.items()]
    expected_bad = Counter(reason for _, reason in bad.values())
    expected_modes = Counter(mode for _, mode in odd.values())
    return samples, expected_bad, expected_modes, set(odd) | set(good)


def _write(tmp: Path, samples: list[dict], **kw) -> list[str]:
    return write_samples(samples, tmp, **kw).shards


def test_every_bad_item_is_skipped_and_counted_and_odd_images_are_converted(tmp_path):
    from vlm.testing import tiny_tokenizer

    samples, expected_bad, expected_modes, survivors = _messy_samples()
    rng = np.random.default_rng(0)
    shards = _write(tmp_path, [samples[i] for i in rng.permutation(len(samples))], samples_per_shard=7)
    loader = CaptionLoader(shards, _config(max_caption_tokens=16), text=tiny_tokenizer())
    batches = list(loader)
    keys = [k for b in batches for k in b.sample_keys]
    assert sorted(keys) == sorted(survivors)
    assert loader.bad_samples == expected_bad
    assert loader.converted == expected_modes
    for batch in batches:
        assert batch["images"].shape[1:] == (3, SIZE, SIZE) and torch.isfinite(batch["images"]).all()
        assert batch["input_ids"].shape[1] <= 16  # the 100k-character caption is truncated, not fatal
    one = next(b for b in batches if "one_pixel" in b.sample_keys)
    assert one["images"].shape[1:] == (3, SIZE, SIZE)


def test_missing_truncated_and_garbage_shards_are_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"s{i:02d}", "png": _encode(_rgb(i)), "json": GOOD} for i in range(12)]
    first = _write(tmp_path / "a", good[:4])[0]
    cut = _write(tmp_path / "b", good[4:8])[0]
    data = Path(cut).read_bytes()
    Path(cut).write_bytes(data[: len(data) * 5 // 8])  # cut mid-way through the third sample
    last = _write(tmp_path / "c", good[8:])[0]
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    missing = str(tmp_path / "missing-000000.tar")
    loader = CaptionLoader([first, missing, cut, str(garbage), last], _config())
    with caplog.at_level(logging.INFO, logger="vlm.data.reader"):
        keys = [k for b in loader for k in b.sample_keys]
    assert set(good[i]["__key__"] for i in [0, 1, 2, 3, 8, 9, 10, 11]) <= set(keys)
    assert set(keys) <= {s["__key__"] for s in good}
    skipped = loader.bad_samples
    assert sum(skipped.values()) >= 3, skipped  # the missing, the cut and the garbage shard each counted
    assert "data pass done: skipped" in caplog.text


def test_a_training_run_over_messy_shards_finishes_and_reports_what_it_skipped(tmp_path, caplog):
    from vlm.testing import tiny_vlm
    from vlm.training import TrainConfig, train

    samples, expected_bad, expected_modes, _ = _messy_samples()
    shards = _write(tmp_path / "data", samples, samples_per_shard=6)
    shards.insert(1, str(tmp_path / "data" / "missing.tar"))
    torch.manual_seed(0)
    model = tiny_vlm("llama")
    loader = CaptionLoader(shards, _config(max_caption_tokens=12), text=model.processor, prompt="Caption:")
    config = TrainConfig(max_steps=4, lr=1e-3, progress=False, tensorboard=False, plot=False)
    with caplog.at_level(logging.INFO, logger="vlm.data.reader"):
        result = train(model, loader, config, tmp_path / "run")
    assert result.step == 4 and all(np.isfinite(result.losses)) and result.skipped_steps == 0
    skipped = loader.bad_samples
    for reason, count in expected_bad.items():  # every pass over the data counted every bad item
        assert skipped[reason] >= count and skipped[reason] % count == 0, (reason, skipped)
    assert sum(skipped.values()) > sum(expected_bad.values())  # ... and the missing shard
    assert all(loader.converted[mode] >= n for mode, n in expected_modes.items())
    assert "data pass done: skipped" in caplog.text


# ----------------------------------------------------------------------------------------------
# Fuzzing the shard reader


def _valid_shard_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            for ext, data in (("png", _encode(_rgb(i, size=8))), ("json", b'{"captions": ["x"]}')):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


VALID = _valid_shard_bytes()
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _read_all(path: Path) -> tuple[list[str], Counter]:
    loader = CaptionLoader([str(path)], _config(batch_size=2, image_size=8))
    keys = []
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 8, 8) and torch.isfinite(batch["images"]).all()
        keys += batch.sample_keys
    return keys, loader.bad_samples


@FUZZ
@given(blob=st.binary(min_size=0, max_size=4096))
def test_fuzz_reader_with_random_bytes(tmp_path, blob):
    path = tmp_path / "fuzz.tar"
    path.write_bytes(blob)
    keys, _ = _read_all(path)  # never raises
    assert keys == []  # random bytes hold no valid sample


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
)
def test_fuzz_reader_with_mutated_shards(tmp_path, flips, cut):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    path = tmp_path / "mutated.tar"
    path.write_bytes(bytes(data[:cut]))
    keys, skipped = _read_all(path)  # never raises; whatever survives is a well-formed sample
    assert set(keys) <= {"k0", "k1", "k2"}
    if not flips and cut is None:
        assert keys == ["k0", "k1", "k2"] and not skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_counts_survive_worker_processes(tmp_path, workers):
    samples, expected_bad, _, survivors = _messy_samples()
    shards = _write(tmp_path, samples, samples_per_shard=5)
    loader = CaptionLoader(shards, _config(num_workers=workers))
    keys = [k for b in loader for k in b.sample_keys]
    assert sorted(keys) == sorted(survivors) and loader.bad_samples == expected_bad
