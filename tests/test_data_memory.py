"""`data.features_in_memory_mb` (`vlm.data.memory.ShardMemo`): later epochs replay the shards' first pass
with the same batches and the same skip counts, within the memory budget, without reading the files."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm.data import DataConfig, write_samples
from vlm.data.decode import FEATURES_EXT
from vlm.data.features import encode_features
from vlm.data.memory import ShardMemo
from vlm.data.reader import CaptionLoader

P, D = 5, 6


def _sample(i: int, features: bytes | None = None) -> dict:
    rows = torch.from_numpy(np.random.default_rng(i).standard_normal((P, D)).astype(np.float32))
    captions = [f"caption {i} {j}" for j in range(3)]  # a random one per epoch: the caption rng is checked too
    return {"__key__": f"s{i:03d}", FEATURES_EXT: encode_features(rows) if features is None else features,
            "png": b"image bytes not needed", "json": {"captions": captions}}  # fmt: skip


def _config(**kw) -> DataConfig:
    base = dict(batch_size=4, sample_shuffle=8, use_cached_features=True, seed=3, drop_last=False)
    return DataConfig(**{**base, **kw})


def _epochs(loader: CaptionLoader, epochs: int) -> list[list[tuple]]:
    passes = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        passes.append([(b.sample_keys, b.captions, b["image_features"].clone()) for b in loader])
    return passes


def _assert_same(a: list[list[tuple]], b: list[list[tuple]]) -> None:
    assert len(a) == len(b)
    for pass_a, pass_b in zip(a, b):
        assert [keys for keys, _, _ in pass_a] == [keys for keys, _, _ in pass_b]
        assert [caps for _, caps, _ in pass_a] == [caps for _, caps, _ in pass_b]
        for (_, _, x), (_, _, y) in zip(pass_a, pass_b):
            assert x.dtype == y.dtype == torch.float32
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.fixture
def shards(tmp_path):
    samples = [_sample(i) for i in range(30)]
    samples[7] = _sample(7, features=b"not an npy file")  # skipped as corrupt_features on every pass
    del samples[11][FEATURES_EXT]  # skipped as missing_features on every pass
    return write_samples(samples, tmp_path, samples_per_shard=6).shards  # 5 shards


def test_memory_replays_the_same_batches_and_counts(shards):
    epochs = 3
    from_disk = CaptionLoader(shards, _config())
    in_memory = CaptionLoader(shards, _config(features_in_memory_mb=64))
    _assert_same(_epochs(in_memory, epochs), _epochs(from_disk, epochs))
    assert in_memory.bad_samples == from_disk.bad_samples == {"corrupt_features": epochs, "missing_features": epochs}
    memo = in_memory.dataset._memo
    assert all(url in memo for url in shards)
    # fp16 as stored, image bytes dropped: 28 decodable samples x P x D x 2 bytes, plus the small members
    assert 28 * P * D * 2 <= memo.used < 28 * P * D * 2 + 30 * 200


def test_later_epochs_do_not_read_the_files(shards):
    loader = CaptionLoader(shards, _config(features_in_memory_mb=64))
    first = _epochs(loader, 1)
    expected = _epochs(CaptionLoader(shards, _config()), 2)
    for url in shards:
        os.remove(url)
    loader.set_epoch(1)
    second = [(b.sample_keys, b.captions, b["image_features"].clone()) for b in loader]
    _assert_same(first + [second], expected)
    assert "broken_tar" not in loader.bad_samples


def test_the_budget_keeps_whole_shards_only(shards):
    one_shard = 6 * P * D * 2 + 6 * 200  # about one shard's fp16 features and captions
    loader = CaptionLoader(shards, _config(features_in_memory_mb=1))
    memo = loader.dataset._shard_memo()
    memo.budget = one_shard
    expected = _epochs(CaptionLoader(shards, _config()), 2)
    _assert_same(_epochs(loader, 2), expected)
    kept = [url for url in shards if url in memo]
    assert 1 <= len(kept) < len(shards) and memo.used <= one_shard


def test_a_broken_shard_is_read_again_and_counted_again(shards, tmp_path):
    cut = Path(shards[2])
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    epochs = 2
    from_disk = CaptionLoader(shards, _config())
    in_memory = CaptionLoader(shards, _config(features_in_memory_mb=64))
    _assert_same(_epochs(in_memory, epochs), _epochs(from_disk, epochs))
    assert in_memory.bad_samples == from_disk.bad_samples
    assert in_memory.bad_samples["truncated_shard"] == epochs
    assert str(cut) not in in_memory.dataset._memo and shards[0] in in_memory.dataset._memo


def test_only_training_on_cached_features_keeps_shards(shards):
    assert CaptionLoader(shards, _config(features_in_memory_mb=64), train=False).dataset._shard_memo() is None
    raw = CaptionLoader(shards, _config(features_in_memory_mb=64), keep_raw=True)
    assert raw.dataset._shard_memo() is None
    assert CaptionLoader(shards, _config()).dataset._shard_memo() is None
    pixels = CaptionLoader(shards, _config(features_in_memory_mb=64), keep_pixels=True).dataset._shard_memo()
    assert pixels.keep_images
    with pytest.raises(ValueError, match="features_in_memory_mb"):
        replace(_config(), features_in_memory_mb=-1)


def test_compact_keeps_unreadable_features_as_bytes():
    memo = ShardMemo(1)
    kept = memo.compact({"__key__": "k", FEATURES_EXT: b"junk", "jpg": b"x", "json": b"{}"})
    assert kept == {"__key__": "k", FEATURES_EXT: b"junk", "json": b"{}"}
    good = memo.compact(_sample(1))
    assert good[FEATURES_EXT].dtype == torch.float16 and good[FEATURES_EXT].shape == (P, D)
