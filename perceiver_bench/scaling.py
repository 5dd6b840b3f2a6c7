"""B13: forward time and peak memory vs input length M at a fixed latent array (the O(M*N + L*N^2) claim).

For each M (``options.lengths``, default 1k ... 256k) a fresh subprocess builds the model, makes a
random input (1, M, C) and times the forward pass (no grad, fp32, batch 1); its peak resident memory
(``ru_maxrss``) minus the memory just before the forward is the forward's working memory. The
Perceiver encoder is compared side by side with a vanilla Transformer of the same width and depth
over the M inputs themselves (input projection + self-attention blocks), once through SDPA and once
through the reference path that materialises the M x M scores. A vanilla variant stops at the first
M where a forward exceeds ``max_seconds`` or its M x M scores would exceed ``memory_limit_gb``.

Fitted: the log-log slope of time vs M (least squares over all measured M, and over M >= 16k).

Options: ``lengths``, ``input_dim`` (64), ``max_seconds`` (20), ``memory_limit_gb`` (4),
``repeats`` (3), ``subprocess`` (true; false = in-process timing only, no memory, for tests),
``vanilla`` (true).
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from resampler.config import from_dict, to_dict
from resampler.nn.attention import AttentionSpec
from resampler.nn.blocks import FeedForwardSpec, SelfAttentionBlock

from .common import RunContext, TaskResult, count_parameters
from .config import BenchConfig, ModelConfig
from .models import make_encoder

TARGET = "log-log slope of time <= 1.1; 256k fits in 4 GB"
DEFAULT_LENGTHS = [1024 * 2**i for i in range(9)]  # 1k ... 256k


class VanillaTransformer(nn.Module):
    """The contrast: project the M inputs to width D and run self-attention blocks over all of them."""

    def __init__(self, mc: ModelConfig, input_dim: int, layers: int, use_sdpa: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, mc.latent_dim)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                mc.latent_dim, AttentionSpec(heads=mc.self_heads, use_sdpa=use_sdpa), FeedForwardSpec(mult=mc.widening)
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


def build(kind: str, mc: ModelConfig, input_dim: int) -> nn.Module:
    layers = mc.num_cross_attends * (1 + mc.num_self_attends)
    if kind == "perceiver":
        return make_encoder(mc, input_dim)
    if kind == "vanilla_sdpa":
        return VanillaTransformer(mc, input_dim, layers, use_sdpa=True)
    if kind == "vanilla_reference":
        return VanillaTransformer(mc, input_dim, layers, use_sdpa=False)
    raise ValueError(f"unknown model kind {kind!r}: expected perceiver, vanilla_sdpa or vanilla_reference")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(kind: str, length: int, mc: ModelConfig, input_dim: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Time (median of ``repeats`` after one warm-up at this M) and memory of one forward."""
    torch.manual_seed(seed)
    model = build(kind, mc, input_dim).eval()
    x = torch.randn(1, length, input_dim)
    before = _rss_mb()
    times = []
    with torch.no_grad():
        start = time.perf_counter()
        model(x)  # warm-up; also the peak-memory run
        warmup = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(repeats if warmup < 5.0 else 0):  # a slow forward is timed once (the warm-up)
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    times = times or [warmup]
    return {
        "kind": kind,
        "length": length,
        "seconds": float(np.median(times)),
        "peak_rss_mb": peak,
        "forward_memory_mb": max(0.0, peak - before),
        "parameters": count_parameters(model),
    }


def _measure_in_subprocess(kind: str, length: int, cfg: BenchConfig, input_dim: int, repeats: int) -> dict[str, Any]:
    payload = json.dumps(
        {
            "kind": kind,
            "length": length,
            "model": to_dict(cfg.model),
            "input_dim": input_dim,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "perceiver_bench.scaling", payload], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return {"kind": kind, "length": length, "error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) vs log(length)."""
    if len(lengths) < 2:
        return float("nan")
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    opts = cfg.data.options
    lengths = [int(m) for m in opts.get("lengths", DEFAULT_LENGTHS)]
    input_dim = int(opts.get("input_dim", 64))
    max_seconds = float(opts.get("max_seconds", 20.0))
    limit_mb = float(opts.get("memory_limit_gb", 4.0)) * 1024
    repeats = int(opts.get("repeats", 3))
    use_subprocess = bool(opts.get("subprocess", True))
    kinds = ["perceiver"] + (["vanilla_sdpa", "vanilla_reference"] if opts.get("vanilla", True) else [])
    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    start_all = time.perf_counter()
    for kind in kinds:
        for length in lengths:
            if kind == "vanilla_reference":
                scores_mb = cfg.model.self_heads * length**2 * 4 / 2**20
                if scores_mb > limit_mb:
                    stopped[kind] = f"stopped before M={length}: its M x M scores alone would take {scores_mb:,.0f} MB"
                    break
            if use_subprocess:
                row = _measure_in_subprocess(kind, length, cfg, input_dim, repeats if length <= 65536 else 1)
            else:
                row = measure(kind, length, cfg.model, input_dim, repeats)
                row["peak_rss_mb"] = row["forward_memory_mb"] = float("nan")
            rows.append(row)
            print(f"   {kind:<18} M={length:>7}: {row}", flush=True)
            if "error" in row:
                stopped[kind] = f"failed at M={length}: {row['error']}"
                break
            if kind != "perceiver" and row["seconds"] > max_seconds:
                stopped[kind] = f"stopped after M={length}: one forward took {row['seconds']:.1f} s > {max_seconds} s"
                break
    wall = time.perf_counter() - start_all

    def series(kind: str, key: str) -> tuple[list[int], list[float]]:
        ok = [r for r in rows if r["kind"] == kind and "error" not in r]
        return [r["length"] for r in ok], [r[key] for r in ok]

    p_len, p_time = series("perceiver", "seconds")
    slope_all = fit_slope(p_len, p_time)
    big = [(m, t) for m, t in zip(p_len, p_time) if m >= 16384]
    slope_big = fit_slope([m for m, _ in big], [t for _, t in big]) if len(big) >= 2 else float("nan")
    _, p_mem = series("perceiver", "peak_rss_mb")
    largest = max(p_len) if p_len else 0
    peak_at_largest = p_mem[p_len.index(largest)] if p_len else float("nan")
    extra: dict[str, Any] = {
        "perceiver_slope_time_all": slope_all,
        "perceiver_slope_time_m_ge_16k": slope_big,
        "perceiver_largest_m": largest,
        "perceiver_peak_rss_mb_at_largest_m": peak_at_largest,
        "vanilla_stopped": stopped,
        "measurements": rows,
    }
    for kind in kinds[1:]:
        v_len, v_time = series(kind, "seconds")
        extra[f"{kind}_slope_time"] = fit_slope(v_len, v_time)
    fig = _plot(rows, kinds, slope_all, ctx.figure_path(f"B13-scaling-{cfg.size}.png"))
    fits = math.isnan(peak_at_largest) or peak_at_largest <= limit_mb
    met = slope_all <= 1.1 and largest >= 262144 and fits and not math.isnan(peak_at_largest)
    return TaskResult(
        metric_name="log-log slope of time vs M",
        metric=slope_all,
        baseline_name="linear",
        baseline=1.0,
        target=TARGET,
        target_met=met,
        higher_is_better=False,
        parameters=rows[0].get("parameters", 0) if rows else 0,
        train_seconds=wall,
        throughput=(largest / p_time[-1]) if p_time else 0.0,  # inputs per second at the largest M
        extra=extra,
        figures=[fig] if fig else [],
    )


def _plot(rows: list[dict[str, Any]], kinds: list[str], slope: float, path) -> str | None:
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, kind in enumerate(kinds):
        ok = [r for r in rows if r["kind"] == kind and "error" not in r]
        if not ok:
            continue
        m = [r["length"] for r in ok]
        t = [r["seconds"] for r in ok]
        label = f"{kind} (slope {fit_slope(m, t):.2f})" if len(m) > 1 else kind
        axes[0].loglog(m, t, marker="o", color=f"C{i}", label=label)
        axes[1].loglog(m, [max(r["forward_memory_mb"], 1e-1) for r in ok], marker="o", color=f"C{i}", label=kind)
    axes[0].set_xlabel("input length M")
    axes[0].set_ylabel("forward seconds (batch 1)")
    axes[0].set_title(f"time: Perceiver slope {slope:.2f}")
    axes[1].set_xlabel("input length M")
    axes[1].set_ylabel("forward working memory (MB)")
    axes[1].axhline(4096, color="gray", linestyle="--", linewidth=1, label="4 GB")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


RUNNERS = {"scaling": run}


if __name__ == "__main__":  # one measurement in a fresh process: python -m perceiver_bench.scaling '<json>'
    args = json.loads(sys.argv[1])
    torch.set_num_threads(int(args["threads"]))
    model_cfg = from_dict(ModelConfig, args["model"])
    print(
        json.dumps(measure(args["kind"], int(args["length"]), model_cfg, int(args["input_dim"]), int(args["repeats"])))
    )
