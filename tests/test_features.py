"""Feature cache: cached fp16 features equal the tower's output on the fly; the reader serves them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from vlm.data import DataConfig, SyntheticConfig, write_samples, write_synthetic_shards
from vlm.data.features import check_feature_cache, encode_features, precompute_features
from vlm.data.reader import CaptionLoader


@pytest.fixture(scope="module")
def tower():
    from vlm.config import VisionConfig
    from vlm.testing import register_tiny_clip, tiny_clip
    from vlm.vision import VisionTower

    model, preprocess = tiny_clip(seed=0)
    return VisionTower(model, VisionConfig(name=register_tiny_clip(), pretrained=None), preprocess)


def test_cached_features_match_on_the_fly_encoding(tmp_path, tower):
    images = write_synthetic_shards(SyntheticConfig(samples_per_shard=7), tmp_path / "img", {"test": 18})["test"]
    h, _ = tower.image_size
    config = DataConfig(batch_size=5, image_size=h, num_workers=1)
    summary = precompute_features(images.pattern, tmp_path / "feat", tower, config, samples_per_shard=8)
    assert summary.num_samples == 18 and summary.samples_per_shard == [8, 8, 2]

    on_the_fly = {}
    for batch in CaptionLoader(images.pattern, config, train=False):
        for key, row, refs in zip(batch.sample_keys, tower(batch["images"]), batch.references):
            on_the_fly[key] = (row, refs)
    cached_config = DataConfig(batch_size=4, image_size=h, use_cached_features=True)
    seen = 0
    for batch in CaptionLoader(summary.pattern, cached_config, train=False, keep_pixels=True):
        assert "images" not in batch and batch["image_features"].dtype == torch.float32
        assert batch["image_features"].shape[1:] == (tower.num_patches, tower.width)
        assert batch.pixels.shape[1:] == (h, h, 3)  # the original image travels along for sample grids
        for key, row, refs in zip(batch.sample_keys, batch["image_features"], batch.references):
            expected, expected_refs = on_the_fly[key]
            assert refs == expected_refs
            # fp16 storage: within half-precision rounding of the fp32 tower output, and exactly its fp16 cast
            torch.testing.assert_close(row, expected.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(row, expected, rtol=1e-3, atol=1e-3)
            seen += 1
    assert seen == 18
    info = json.loads((tmp_path / "feat" / "features-features.json").read_text())
    assert info["feature_shape"] == [tower.num_patches, tower.width] and info["dtype"] == "float16"
    check_feature_cache(tmp_path / "feat" / "features-features.json", feature_shape=(tower.num_patches, tower.width))
    with pytest.raises(ValueError, match="re-run precompute_features"):
        check_feature_cache(tmp_path / "feat" / "features-features.json", feature_shape=(4, 8))


def test_bad_images_are_counted_while_caching(tmp_path, tower):
    good = write_synthetic_shards(SyntheticConfig(), tmp_path / "src", {"val": 3})["val"]
    samples = [{"__key__": "broken", "png": b"\x89PNG not really", "json": {"captions": ["x"]}}]
    bad = write_samples(samples, tmp_path / "src", prefix="bad")
    h, _ = tower.image_size
    summary = precompute_features(
        good.shards + bad.shards, tmp_path / "feat", tower, DataConfig(batch_size=2, image_size=h), keep_images=False
    )
    assert summary.num_samples == 3 and summary.skipped == {"corrupt_image": 1}
    loader = CaptionLoader(summary.pattern, DataConfig(batch_size=2, image_size=h, use_cached_features=True))
    assert sum(len(b.sample_keys) for b in loader) == 3
    images_only = CaptionLoader(good.pattern, DataConfig(batch_size=2, image_size=h, use_cached_features=True))
    assert sum(len(b.sample_keys) for b in images_only) == 0 and images_only.bad_samples == {"missing_features": 3}


def test_features_must_be_per_sample_matrices(tmp_path):
    with pytest.raises(ValueError, match=r"\(P, D\)"):
        encode_features(torch.zeros(2, 3, 4))
    array = np.load(io.BytesIO(encode_features(torch.ones(3, 4))))
    assert array.dtype == np.float16 and array.shape == (3, 4)
    images = write_synthetic_shards(SyntheticConfig(), tmp_path, {"val": 2})["val"]
    with pytest.raises(ValueError, match=r"\(B, P, D\)"):
        precompute_features(images.pattern, tmp_path / "f", lambda x: x.flatten(1), DataConfig(batch_size=2))
