"""Every benchmark task at its smoke size learns: its metric beats the trivial baseline by a clear margin.

These are the same code paths as ``perceiver-bench run <task> --size full``, on tiny data and models.
"""

from __future__ import annotations

import math

import pytest

from perceiver_bench import run_task


def test_b1_digits_learns():
    r = run_task("digits", "smoke")
    assert r.metric >= r.baseline + 0.4, r


def test_b3_point_clouds_learn():
    r = run_task("point_clouds", "smoke")
    assert r.metric >= r.baseline + 0.15, r
    assert r.extra["max_logit_diff_under_point_shuffle"] < 1e-4  # an unordered set


def test_b4_audio_learns():
    r = run_task("audio", "smoke")
    assert r.metric >= r.baseline + 0.2, r


def test_b6_byte_classification_learns():
    r = run_task("bytes_classify", "smoke")
    assert r.metric >= r.baseline + 0.25, r


def test_b7_flow_beats_zero_flow():
    r = run_task("flow", "smoke")
    assert not r.higher_is_better
    assert r.metric <= 0.75 * r.baseline, r


def test_b8_multimodal_infers_the_masked_label():
    r = run_task("multimodal", "smoke")
    assert r.metric >= r.baseline + 0.1, r
    assert math.isfinite(r.extra["video_psnr_db"])


def test_b10_entities_learn_and_ignore_padding():
    r = run_task("entities", "smoke")
    assert r.metric >= r.baseline + 0.2, r
    assert r.extra["max_diff_with_extra_padding"] < 1e-5
    assert r.extra["max_diff_under_shuffle"] < 1e-5


def test_b11_mirror_copy_with_cache():
    r = run_task("mirror_copy", "smoke")
    assert r.metric >= 0.9 and r.baseline <= 0.05, r
    assert r.extra["cached_equals_uncached_tokens"]
    assert r.extra["max_logit_diff_cached_vs_uncached"] < 1e-4


def test_b12_resampler_probe_and_pad_invariance():
    r = run_task("resampler_media", "smoke")
    assert r.metric >= r.baseline + 0.3, r
    assert r.extra["pad_invariance_max_abs_diff_sdpa"] <= 1e-5
    assert r.extra["pad_invariance_max_abs_diff_reference"] <= 1e-5
    assert r.extra["pad_invariance_max_abs_diff_float64"] <= 1e-12  # exact up to float64 rounding


def test_b13_scaling_measures_every_length():
    r = run_task("scaling", "smoke")
    rows = r.extra["measurements"]
    lengths = sorted({row["length"] for row in rows if row["kind"] == "perceiver"})
    assert len(lengths) >= 3 and all(row["seconds"] > 0 for row in rows)
    assert math.isfinite(r.metric)


@pytest.mark.slow
def test_b2_permuted_digits_same_as_unpermuted():
    r = run_task("permuted_digits", "smoke")
    assert r.metric >= r.baseline + 0.4, r
    # a Perceiver is permutation invariant over its inputs: the same model, unpermuted inputs, same logits
    assert r.extra["max_logit_diff_permuted_vs_unpermuted"] < 1e-4
    assert abs(r.extra["accuracy_on_unpermuted_inputs"] - r.metric) < 1e-9


@pytest.mark.slow
def test_b5_byte_mlm_beats_unigram():
    r = run_task("bytes_mlm", "smoke", ["train.steps=600"])
    assert r.metric >= r.baseline + 0.05, r


@pytest.mark.slow
def test_b9_multitask_learns_every_task():
    r = run_task("multitask", "smoke")
    multi, majority = r.extra["multi_task_accuracy"], r.extra["majority_accuracy"]
    for name, acc in majority.items():
        assert multi[f"{name}_accuracy"] >= acc + 0.1, (name, r.extra)
