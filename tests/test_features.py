"""Feature cache: cached fp16 features equal the tower's output on the fly; the reader serves them; a cache
built from other shards, another tower config or another preprocessing is never reused."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from vlm.data import DataConfig, SyntheticConfig, build_transform, write_samples, write_synthetic_shards
from vlm.data.features import check_feature_cache, encode_features, feature_recipe, precompute_features
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
    recipe = feature_recipe(images.pattern, {}, build_transform(config))
    assert check_feature_cache(tmp_path / "feat" / "features-features.json", recipe) == []


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


# ----------------------------------------------------------------------------------------------
# A cache is reused only for exactly what it was built from


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A registered tiny open_clip config and a weights file: every load gives the same tower."""
    from vlm.testing import register_tiny_clip, tiny_clip

    model, _ = tiny_clip(seed=0)
    path = tmp_path_factory.mktemp("weights") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return register_tiny_clip(), str(path)


def _run(tmp_path, tiny_weights, train_shards: str, layer: str = "last", on_change: str = "rebuild"):
    from vlm.config import VisionConfig, VLMConfig
    from vlm.pipeline import FeaturesConfig, RunConfig

    name, weights = tiny_weights
    return RunConfig(
        output_dir=str(tmp_path / "run"),
        model=VLMConfig(vision=VisionConfig(name=name, pretrained=weights, layer=layer)),
        data=DataConfig(train_shards=train_shards, use_cached_features=True, image_size=32, batch_size=4),
        features=FeaturesConfig(splits=("train",), batch_size=4, on_change=on_change),
    )


def _cached(cfg) -> dict[str, torch.Tensor]:
    from vlm.pipeline import split_spec

    loader = CaptionLoader(split_spec(cfg, "train"), cfg.data, train=False)
    return {k: f for b in loader for k, f in zip(b.sample_keys, b["image_features"])}


def _expected(cfg) -> dict[str, torch.Tensor]:
    """The tower of ``cfg.model.vision`` run now on the raw shards, cast to fp16 like the cache."""
    from dataclasses import replace

    from vlm.vision import VisionTower, load_open_clip

    model, preprocess = load_open_clip(cfg.model.vision)
    tower = VisionTower(model, cfg.model.vision, preprocess)
    loader = CaptionLoader(cfg.data.train_shards, replace(cfg.data, use_cached_features=False), transform=preprocess,
                           train=False)  # fmt: skip
    return {k: f.half().float() for b in loader for k, f in zip(b.sample_keys, tower(b["images"]))}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_feature_cache_is_rebuilt_when_data_train_shards_change(tmp_path, tiny_weights):
    """The reported corruption: after changing data.train_shards, training ran on the old features."""
    from vlm.pipeline import ensure_feature_cache

    world = SyntheticConfig(image_size=32)
    a = write_synthetic_shards(world, tmp_path / "a", {"train": 6})["train"]
    b = write_synthetic_shards(SyntheticConfig(image_size=32, seed=1), tmp_path / "b", {"train": 5})["train"]
    first = _run(tmp_path, tiny_weights, a.pattern)
    ensure_feature_cache(first)
    assert _same(_cached(first), _expected(first))
    second = _run(tmp_path, tiny_weights, str(tmp_path / "b" / "train-*.tar"))
    ensure_feature_cache(second)
    got, want = _cached(second), _expected(second)
    assert _same(got, want), "the cache still holds the features of the old shards"
    assert b.num_samples == len(got) == 5


def test_feature_cache_is_rebuilt_when_model_vision_layer_changes(tmp_path, tiny_weights):
    """The reported corruption: after changing model.vision.layer, training ran on the old features."""
    from vlm.pipeline import ensure_feature_cache

    shards = write_synthetic_shards(SyntheticConfig(image_size=32), tmp_path / "a", {"train": 6})["train"]
    ensure_feature_cache(_run(tmp_path, tiny_weights, shards.pattern, layer="last"))
    penultimate = _run(tmp_path, tiny_weights, shards.pattern, layer="penultimate")
    ensure_feature_cache(penultimate)
    assert _same(_cached(penultimate), _expected(penultimate)), "the cache still holds last-layer features"


def test_unchanged_cache_is_reused_and_a_changed_one_is_refused_on_request(tmp_path, tiny_weights, capsys):
    from vlm.pipeline import ensure_feature_cache

    shards = write_synthetic_shards(SyntheticConfig(image_size=32), tmp_path / "a", {"train": 6})["train"]
    cfg = _run(tmp_path, tiny_weights, shards.pattern)
    ensure_feature_cache(cfg)
    cache = {p: p.stat().st_mtime_ns for p in cfg.features_dir.iterdir()}
    ensure_feature_cache(_run(tmp_path, tiny_weights, shards.pattern, on_change="error"))
    assert {p: p.stat().st_mtime_ns for p in cfg.features_dir.iterdir()} == cache  # reused, not rewritten
    with pytest.raises(ValueError, match=r"model.vision.layer: 'last' -> 'penultimate'.*features.on_change=rebuild"):
        ensure_feature_cache(_run(tmp_path, tiny_weights, shards.pattern, layer="penultimate", on_change="error"))
    write_synthetic_shards(SyntheticConfig(image_size=32, seed=3), tmp_path / "a", {"train": 6})  # same names
    with pytest.raises(ValueError, match=r"source shards: 1 changed \(size or time\): train-000000.tar"):
        ensure_feature_cache(_run(tmp_path, tiny_weights, shards.pattern, on_change="error"))
    capsys.readouterr()
    ensure_feature_cache(cfg)  # the default rebuilds, and says why
    assert "rebuilding, it was built from other inputs: source shards: 1 changed" in capsys.readouterr().out
    assert _same(_cached(cfg), _expected(cfg))


def test_recipe_names_every_kind_of_difference(tmp_path):
    from torchvision import transforms

    shards = write_samples(
        [{"__key__": f"k{i}", "png": b"x", "json": {"captions": ["c"]}} for i in range(2)], tmp_path, "s", 1
    )
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")
    vision = {"name": "ViT-B-32", "pretrained": str(weights), "layer": "last", "keep_cls": False}
    old = feature_recipe(shards.pattern, vision, transforms.Resize(32))
    index = tmp_path / "s-features.json"
    index.write_text(json.dumps({"recipe": old}))
    assert check_feature_cache(index, old) == []
    weights.write_bytes(b"22")
    new = feature_recipe(shards.shards[:1], {**vision, "keep_cls": True, "hf_revision": "v2"}, transforms.Resize(64))
    changes = check_feature_cache(index, new, "model.vision")
    assert changes == [
        "source shards: 1 removed: s-000001.tar",
        "model.vision.hf_revision: '<absent>' -> 'v2'",  # a field someone adds later is compared too
        "model.vision.keep_cls: False -> True",
        "vision weights: 1 changed (size or time): w.pt",
        "preprocess: 'Resize(size=32, interpolation=bilinear, max_size=None, antialias=True)' -> "
        "'Resize(size=64, interpolation=bilinear, max_size=None, antialias=True)'",
    ]
    moved = tmp_path / "copy"
    moved.mkdir()
    for shard in shards.shards:  # the same shards and weights in another folder: one line that says where
        shutil.copy2(shard, moved)
    shutil.copy2(weights, moved)
    copied = feature_recipe(
        str(moved / "s-{000000..000001}.tar"), {**vision, "pretrained": str(moved / "w.pt")}, transforms.Resize(32)
    )
    assert check_feature_cache(index, copied) == [
        f"source shards: the same 2 file names, now in {moved} (were in {tmp_path})",
        f"vision.pretrained: {str(weights)!r} -> {str(moved / 'w.pt')!r}",
        f"vision weights: the same 1 file name, now in {moved} (were in {tmp_path})",
    ]
    index.write_text(json.dumps({"feature_shape": [4, 8]}))  # a cache of an older version records no recipe
    assert "records no recipe" in check_feature_cache(index, new)[0]


def test_images_without_captions_are_cached_for_prediction(tmp_path, tower):
    """NoCaps test images (``captions: []``) go through the cache; a training reader still skips them."""
    samples = [{"__key__": f"t{i}", "png": _png(i), "json": {"captions": [], "image_id": i}} for i in range(3)]
    source = write_samples(samples, tmp_path / "src", prefix="test")
    h, _ = tower.image_size
    summary = precompute_features(source.pattern, tmp_path / "feat", tower, DataConfig(batch_size=2, image_size=h))
    assert summary.num_samples == 3
    cached = DataConfig(batch_size=2, image_size=h, use_cached_features=True)
    predict = CaptionLoader(summary.pattern, cached, train=False, allow_uncaptioned=True)
    assert sorted(k for b in predict for k in b.sample_keys) == ["t0", "t1", "t2"]
    training = CaptionLoader(summary.pattern, cached)
    assert not list(training) and training.bad_samples == {"empty_caption": 3}


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()
