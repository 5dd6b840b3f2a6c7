"""The synthetic captioning world: determinism, held-out combinations, captions <-> ground truth, pixels."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.data import DataConfig, SyntheticConfig, generate_scene, parse_caption, write_synthetic_shards
from vlm.data.reader import CaptionLoader
from vlm.data.synthetic import COLOUR_RGB, POSITIONS, SPLITS, caption_vocabulary

CFG = SyntheticConfig()


def _truth(scene) -> list[tuple]:
    return sorted((o.shape, o.colour, o.size, o.position) for o in scene.objects)


def test_scenes_are_deterministic_and_distinct():
    a, b = generate_scene(CFG, "train", 7), generate_scene(CFG, "train", 7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.captions == b.captions and a.objects == b.objects
    other = generate_scene(CFG, "test", 7)  # same index, other split: another image
    assert not np.array_equal(np.asarray(a.image), np.asarray(other.image))
    reseeded = generate_scene(SyntheticConfig(seed=1), "train", 7)
    assert not np.array_equal(np.asarray(a.image), np.asarray(reseeded.image))


@pytest.mark.parametrize("split", SPLITS)
def test_every_caption_parses_back_to_the_ground_truth(split):
    for index in range(120):
        scene = generate_scene(CFG, split, index)
        assert len(scene.captions) == CFG.captions_per_image
        assert len(set(scene.captions)) == len(scene.captions)  # paraphrases, not copies
        for caption in scene.captions:
            parsed = sorted((o["shape"], o["colour"], o["size"], o["position"]) for o in parse_caption(caption, CFG))
            assert parsed == _truth(scene), caption
            assert set(caption.rstrip(".").replace(",", "").replace(":", "").split()) <= set(caption_vocabulary(CFG))


def test_holdout_pairs_never_in_train_and_always_in_compositional():
    held = CFG.holdout_pairs
    counts = Counter()
    for index in range(600):
        scene = generate_scene(CFG, "train", index)
        counts[len(scene.objects)] += 1
        assert not any((o.colour, o.shape) in held for o in scene.objects)
        assert len({o.position for o in scene.objects}) == len(scene.objects)  # one object per cell
    for index in range(100):
        assert any((o.colour, o.shape) in held for o in generate_scene(CFG, "compositional", index).objects)
        assert not any((o.colour, o.shape) in held for o in generate_scene(CFG, "test", index).objects)
    weights = np.asarray(CFG.object_count_weights) / sum(CFG.object_count_weights)
    for n in (1, 2, 3):  # 600 draws: within 5 standard deviations of the configured mix
        assert abs(counts[n] / 600 - weights[n - 1]) < 5 * np.sqrt(weights[n - 1] * (1 - weights[n - 1]) / 600)


def test_objects_are_drawn_where_and_how_the_captions_say():
    side = CFG.image_size
    palette = {name: np.asarray(COLOUR_RGB[name], dtype=float) for name in CFG.colours}
    for index in range(60):
        scene = generate_scene(CFG, "train", index)
        pixels = np.asarray(scene.image, dtype=float)
        boxes = []
        for obj in scene.objects:
            cx, cy = POSITIONS[obj.position]
            assert abs(obj.x - cx) <= CFG.jitter + 1e-9 and abs(obj.y - cy) <= CFG.jitter + 1e-9
            x, y = int(obj.x * side), int(obj.y * side)
            rgb = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)  # the shape's centre is filled
            nearest = min(palette, key=lambda name: np.abs(palette[name] - rgb).sum())
            assert nearest == obj.colour, (index, obj, rgb)
            half = CFG.size_fractions[CFG.sizes.index(obj.size)] * side / 2
            assert half <= obj.x * side <= side - half and half <= obj.y * side <= side - half  # inside the image
            boxes.append((obj.x * side - half, obj.y * side - half, obj.x * side + half, obj.y * side + half))
        for i, a in enumerate(boxes):  # no two objects overlap
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        far = pixels[: side // 12, : side // 12].mean((0, 1))  # corners stay background
        assert far.max() < 60


def test_large_objects_cover_more_pixels_than_small_ones():
    areas = {"small": [], "large": []}
    for index in range(200):
        scene = generate_scene(CFG, "train", index)
        if len(scene.objects) == 1 and scene.objects[0].shape == "square":
            lit = (np.asarray(scene.image, dtype=float).max(-1) > 90).sum()
            areas[scene.objects[0].size].append(lit)
    assert areas["small"] and areas["large"]
    assert min(areas["large"]) > 1.8 * max(areas["small"])


def test_parse_caption_handles_partial_and_wrong_captions():
    assert parse_caption("a large red on the left.", CFG) == [
        {"shape": None, "colour": "red", "size": "large", "position": "left"}
    ]
    assert parse_caption("a blue circle and a square at the top", CFG) == [
        {"shape": "circle", "colour": "blue", "size": None, "position": None},
        {"shape": "square", "colour": None, "size": None, "position": "top"},
    ]
    assert parse_caption("", CFG) == []


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="holdout"):
        SyntheticConfig(holdout=("pink/circle",))
    with pytest.raises(ValueError, match="unknown: \\['hexagon', 'pink'\\]"):
        SyntheticConfig(shapes=("circle", "hexagon"), colours=("red", "pink"), holdout=())
    with pytest.raises(ValueError, match="size_fractions"):
        SyntheticConfig(size_fractions=(0.2,))
    with pytest.raises(ValueError, match="split"):
        generate_scene(CFG, "training", 0)


def test_shards_hold_images_captions_and_ground_truth(tmp_path):
    summaries = write_synthetic_shards(CFG, tmp_path, {"train": 12, "compositional": 5})
    assert summaries["train"].num_samples == 12 and summaries["compositional"].num_samples == 5
    loader = CaptionLoader(
        summaries["train"].pattern, DataConfig(batch_size=5, preprocess="plain"), train=False, keep_pixels=True
    )
    seen = 0
    for batch in loader:
        for key, refs, meta, pixels in zip(batch.sample_keys, batch.references, batch.meta, batch.pixels):
            scene = generate_scene(CFG, "train", int(key.split("-")[1]))
            assert refs == scene.captions and meta["objects"][0]["shape"] == scene.objects[0].shape
            assert np.array_equal(pixels, np.asarray(scene.image))  # PNG: lossless
            seen += 1
    assert seen == 12 and not loader.bad_samples
    with tarfile.open(summaries["train"].shards[0]) as tar:  # plain tar members: key.json + key.png
        assert tar.getnames()[:2] == ["train-0000000.json", "train-0000000.png"]
        assert Image.open(io.BytesIO(tar.extractfile("train-0000000.png").read())).size == (64, 64)


def test_parallel_rendering_writes_identical_shards(tmp_path):
    serial = write_synthetic_shards(CFG, tmp_path / "a", {"val": 40}, workers=1)["val"]
    parallel = write_synthetic_shards(CFG, tmp_path / "b", {"val": 40}, workers=2)["val"]
    assert [Path(p).read_bytes() for p in serial.shards] == [Path(p).read_bytes() for p in parallel.shards]
