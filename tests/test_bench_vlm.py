"""benchmarks/bench_vlm.py on tiny sizes: the converted models train and generate like their references,
so the whole-VLM speed ratios compare the same computation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_whole_vlm_benchmark_compares_the_same_computation():
    import bench_vlm

    result = bench_vlm.run(smoke=True, repeats=1)
    assert set(result["rows"]) == {"idefics2", "idefics"}
    for name, row in result["rows"].items():
        train, generate = row["train"], row["generate"]
        assert train["trainable_ref"] == train["trainable_ours"] > 0, name
        assert train["loss_delta"] < 1e-5 * max(1.0, train["loss_ref"]), (name, train)
        assert train["grad_norm_rel_delta"] < 1e-4, (name, train)
        assert generate["identical"], (name, generate)
        assert train["floor_ms"]["tower"] > 0 and train["floor_ms"]["lm"] > 0
    assert "identical tokens: True" in bench_vlm.table(result)
