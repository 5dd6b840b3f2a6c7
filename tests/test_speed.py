"""The benchmark helpers' correctness: peak memory counting and the goals table."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import peak_memory_mb  # noqa: E402


def test_peak_memory_counts_allocations():
    def allocate() -> torch.Tensor:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # another 4 MiB while a is alive
        return b.sum()

    peak = peak_memory_mb(allocate)
    assert 7.9 <= peak <= 8.5, peak


def test_goals_table_marks_met_and_missed():
    import speed

    results = {
        "perceiver_io": {
            "ratios": {
                "transformers": {"train_speedup": 1.9, "forward_memory_ratio_at_memory_inputs": 0.6},
                "perceiver-pytorch": {"train_speedup": 1.2},
            }
        },
        "qlora": {"rows": {"4bit": {"total_ratio": 0.2, "linear_ratio": 0.14}}},
    }
    rows = {r["goal"]: r["met"] for r in speed.goals(results)}
    assert rows == {
        "Perceiver IO fwd+bwd vs transformers": True,
        "Perceiver IO fwd+bwd vs perceiver-pytorch": False,
        "Perceiver IO peak memory at 256k inputs vs transformers": False,
        "4-bit LM weights vs fp32": True,
    }


def test_issue_19_goals_read_the_vlm_rows_and_the_vit_l_adapter_row():
    import speed

    vlm = {
        "mode": "prefix",
        "train": {"speedup": 1.35, "bound": 1.6, "ceiling_bound": 1.2, "memory_ratio": 0.85},
        "generate": {"speedup": 1.3, "identical": False, "ceiling_bound": 1.4},
    }
    adapter = {"label": "ViT-B-32 + LM 4x512", "cached_speedup": 1.6, "size": {"tower": "ViT-B-32"}}
    adapter["sweep"] = [
        dict(adapter),
        {"label": "ViT-L-14 + LM 2x256", "cached_speedup": 12.0, "size": {"tower": "ViT-L-14"}},
    ]
    rows = {
        r["goal"]: (r["met"], r["measured"])
        for r in speed.goals({"vlm": {"rows": {"idefics2": vlm}}, "adapter": adapter})
    }
    assert rows == {
        "adapter training: cached features vs image shards": (True, 12.0),  # at the ViT-L-14 tower
        "VLM training step vs Idefics2 (prefix)": (True, 1.35),
        "VLM training peak memory vs Idefics2": (False, 0.85),
        "VLM generation tokens/s vs Idefics2 generate": (False, 1.3),  # fast but not identical: missed
    }
    notes = {r["goal"]: r["note"] for r in speed.goals({"vlm": {"rows": {"idefics2": vlm}}})}
    # a ceiling below the measured speed-up means ours already beats it: the bound is what was measured
    assert "with the connector at the GEMM rate 1.35x" in notes["VLM training step vs Idefics2 (prefix)"]
    assert "decoding at the GEMM rate 1.40x" in notes["VLM generation tokens/s vs Idefics2 generate"]
