"""benchmarks/gpu_check.py on a machine without CUDA: it says so, runs every section at tiny sizes on the
CPU (the same code as the GPU check: bf16 autocast, 4-bit bitsandbytes, generation, the peers) and exits 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback; on a CUDA machine run the script itself")
def test_gpu_check_without_cuda_runs_a_dry_run_and_exits_0(tmp_path, capsys):
    import gpu_check

    assert gpu_check.main(["--json", str(tmp_path / "check.json")]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device here" in out and "every section ran" in out
    results = json.loads((tmp_path / "check.json").read_text())
    assert results["plan"]["device"] == "cpu"
    sections = [
        "train/prefix",
        "train/cross_attention",
        "qlora",
        "generate",
        "sdpa",
        "precision",
        "resampler",
        "perceiver_io",
    ]
    for name in sections:
        assert "error" not in results[name], results[name].get("traceback")
    for name in ("train/prefix", "train/cross_attention", "qlora"):
        assert results[name]["samples_per_s"] > 0 and results[name]["tokens_per_s"] > 0
    assert any("scaled_dot_product" in k for k in results["sdpa"]["kernels"])
    assert results["precision"]["relative_difference"] < 0.05  # bf16 autocast tracks the fp32 loss
    assert results["generate"]["tokens_per_s"] > 0
    assert max(results["resampler"]["max_abs_diff"].values()) < 1e-4  # ours computes the peers' function
