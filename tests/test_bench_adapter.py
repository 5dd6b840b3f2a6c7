"""The adapter-throughput benchmark measures what it says: same samples both ways, stages that add up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_adapter_throughput as bench  # noqa: E402


@pytest.fixture(scope="module")
def result():
    return bench.run_all(smoke=True, repeats=2)


def test_both_paths_train_on_the_same_samples_and_features(result):
    check = result["loss_check"]
    # the cache stores the tower's own features in fp16: relative rounding <= 2^-11 of the largest value
    assert check["feature_max_rel_error"] <= 2.0**-11
    assert check["abs_diff"] < 1e-3 * abs(check["loss_images"])


def test_step_split_adds_up_and_the_cached_path_skips_the_tower(result):
    for name in bench.PATHS:
        path = result["paths"][name]
        assert set(path["split_ms"]) == set(bench.STAGES)
        median_step = sorted(path["all_ms"])[len(path["all_ms"]) // 2]
        assert sum(path["split_ms"].values()) == pytest.approx(median_step)
        assert path["samples_per_s"] == pytest.approx(result["size"]["batch"] / (path["step_ms"] / 1e3))
    assert result["paths"]["images from shards"]["split_ms"]["vision"] > 0
    assert result["paths"]["features from cache"]["split_ms"]["vision"] == 0
    assert result["paths"]["features in memory"]["split_ms"]["vision"] == 0


def test_ratios_follow_from_the_measured_steps(result):
    paths = result["paths"]
    images, cached = paths["images from shards"], paths["features from cache"]
    assert result["cached_speedup"] == pytest.approx(images["step_ms"] / cached["step_ms"])
    removed = images["split_ms"]["data"] + images["split_ms"]["vision"]
    assert result["removed_by_cache_ms"] == pytest.approx(removed)
    assert result["amdahl_bound"] == pytest.approx((removed + cached["step_ms"]) / cached["step_ms"])
    connector = paths["connector only"]["step_ms"]
    assert result["free_lm_bound"] == pytest.approx((removed + connector) / connector)


def test_sweep_rows_and_table(result):
    sizes = [row["size"] for row in result["sweep"]]
    assert sizes == [bench.asdict(s) for s in bench.SMOKE_SWEEP]
    assert result["sweep"][0] is not None and result["sweep"][0]["size"] == result["size"]  # headline reused
    table = bench.format_table(result)
    for row in result["sweep"]:
        assert row["label"] in table
    assert "When caching pays" in table
    json.dumps(result)  # the suite writes it to speed.json: plain data, no cycles


def test_readers_that_disagree_are_refused(tmp_path):
    import io

    from vlm.data import SyntheticConfig, generate_scene, write_samples

    model = bench.build(bench.SMOKE)
    shard = bench.write_jpeg_shards(tmp_path, 8, 48)

    def reversed_samples():  # the same samples in the opposite order: a cache that does not match the images
        for index in reversed(range(8)):
            scene = generate_scene(SyntheticConfig(image_size=48), "train", index)
            buffer = io.BytesIO()
            scene.image.save(buffer, format="JPEG")
            yield {"__key__": scene.key, "jpg": buffer.getvalue(), "json": scene.metadata()}

    other = write_samples(reversed_samples(), tmp_path / "other", prefix="train").shards[0]
    from_images, _ = bench.loaders(model, shard, shard, 4)
    from_other, _ = bench.loaders(model, other, other, 4)
    with pytest.raises(ValueError, match="readers disagree"):
        bench.check_same_training(model, from_images, from_other)
