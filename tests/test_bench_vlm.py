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
        # the connector's and the decode steps' FLOPs are what is left of a whole count: both are real work
        assert train["connector_gflop"] > 0 and generate["decode_gflop"] > 0, name
        assert train["ceiling_ms"] > train["floor_ms"]["tower"] + train["floor_ms"]["lm"], name
        assert generate["ceiling_ms"] > generate["prefill_ms"], name
    assert "identical tokens: True" in bench_vlm.table(result)


def test_flop_count_matches_the_formula_also_under_no_grad():
    """common.count_flops: a linear layer's forward is 2 m n k; its backward with the input and the weight
    both needing gradients adds 2 m n k each; under no_grad (as inside ``generate``) it still counts."""
    import torch
    from common import count_flops

    m, n, k = 8, 16, 32
    layer = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * m * n * k
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == 2 * m * n * k
    layer.requires_grad_(False)  # a frozen layer: only the input's gradient
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * 2 * m * n * k
