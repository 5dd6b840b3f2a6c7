"""The performance suite (issues 8 and 19): every side-by-side benchmark in one run, one table, JSON + Markdown + plots.

    .venv/bin/python benchmarks/speed.py --out docs            # everything, ~60-90 min on 2 cores; updates docs/
    .venv/bin/python benchmarks/speed.py --smoke               # tiny sizes, ~2 min (checks that it all runs)
    .venv/bin/python benchmarks/speed.py --parts gemm int8     # some parts only (default out: runs/speed)
    .venv/bin/python benchmarks/speed.py --parts scaling --merge --out docs   # re-run one part, keep the rest

Parts (each is its own script too; the suite calls them in one process, except B13's subprocesses):
  gemm          measured fp32 GEMM FLOP/s of a 2048^3 torch.mm: the ceiling (benchmarks/common.py)
  resampler     ours vs flamingo-pytorch vs Idefics2, fwd and fwd+bwd, fraction of the ceiling
                (bench_resampler.py; one thread, process CPU time)
  perceiver_io  ours vs transformers PerceiverModel vs perceiver-pytorch at 50k inputs / 512 latents,
                peak memory at 256k inputs (bench_perceiver_io.py)
  int8          resampler.quantize int8 vs fp32 forward, resampler and Perceiver encoder (bench_int8.py)
  scaling       B13: encoder time and memory vs M = 1k ... 256k vs vanilla self-attention (perceiver_bench)
  adapter       adapter training samples/s, cached features vs images through the tower (bench_adapter_throughput.py)
  qlora         LM weight memory fp32 / 8-bit / 4-bit and a LoRA step's peak (bench_qlora_memory.py)
  vlm           the whole VLM converted from Idefics2 (prefix) and IDEFICS (cross-attention) vs the
                transformers model: training step, peak memory, batched generation (bench_vlm.py)

Every part compares peers in the same process, interleaved (the machine is shared: ratios are the
result, absolute ms drift). The issues' goals are checked at the end and marked met / MISSED.
A part that fails is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench_adapter_throughput  # noqa: E402
import bench_int8  # noqa: E402
import bench_perceiver_io  # noqa: E402
import bench_qlora_memory  # noqa: E402
import bench_resampler  # noqa: E402
import bench_vlm  # noqa: E402
from common import gemm_flops  # noqa: E402
from speed_report import bar_plot, format_goals, goals, resampler_text, scaling_text, write_outputs  # noqa: E402,F401

# Ours-only parts first, the long peer comparisons after: a run cut short still has most numbers.
PARTS = ["gemm", "int8", "qlora", "adapter", "perceiver_io", "scaling", "resampler", "vlm"]


# ----------------------------------------------------------------------------------------- parts


def part_gemm(smoke: bool, _figures: Path) -> dict:
    n = 512 if smoke else 2048
    rates = [gemm_flops(n=n, repeats=5) for _ in range(3)]
    return {"n": n, "flops": max(rates), "samples": rates}


def part_resampler(smoke: bool, _figures: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resampler.json"
        # One thread, process CPU time: with 2 threads the wall clock of this VM's two vCPUs spread
        # 26-58% between repeats on an idle machine (2026-12-01), one thread 10-38%.
        threads = torch.get_num_threads()
        try:
            bench_resampler.main(
                (["--smoke"] if smoke else []) + ["--before", "--threads", "1", "--clock", "cpu", "--json", str(path)]
            )
        finally:
            torch.set_num_threads(threads)
        result = json.loads(path.read_text())
    rows = {(r["mode"], r["model"]): r for r in result["rows"] if "ms" in r}  # (the GEMM row has only a rate)
    peers = [m for (mode, m) in rows if mode == "forward" and "(" not in m]  # ours(peer), before(peer): copies
    summary = {}
    for mode in ("forward", "forward+backward"):
        # Each peer against our copy of it (the same function, weights converted): the fastest peer's
        # ratio is the goal's number, the smallest ratio over the peers is shown beside it.
        ratios = {p: rows[(mode, p)]["ms"] / rows[(mode, f"ours({p})")]["ms"] for p in peers}
        fastest = min(peers, key=lambda p: rows[(mode, p)]["ms"])
        summary[mode] = {
            "fastest_peer": fastest,
            "fastest_peer_ms": rows[(mode, fastest)]["ms"],
            "ours_ms": rows[(mode, f"ours({fastest})")]["ms"],
            "speedup_vs_fastest_peer": ratios[fastest],
            "speedup_vs_each_peer": ratios,
            "ours_fraction_of_gemm": rows[(mode, f"ours({fastest})")]["fraction_of_gemm"],
            "peer_fraction_of_gemm": {p: rows[(mode, p)]["fraction_of_gemm"] for p in peers},
            "vs_flamingo_pytorch": ratios.get("flamingo-pytorch"),
            "alternating_loop": {
                r["model"]: r["speedup_vs_peer"]
                for r in result["rows"]
                if r.get("harness") == "alternating" and r["mode"] == mode
            },
        }
    return {"raw": result, "summary": summary}


def part_perceiver_io(smoke: bool, figures: Path) -> dict:
    size = bench_perceiver_io.SMOKE if smoke else bench_perceiver_io.Size()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, process CPU time, as the resampler part: ratios on a shared machine
    try:
        result = bench_perceiver_io.run(size, repeats=3, clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    print(bench_perceiver_io.format_table(result))
    bar_plot(
        figures / "speed_perceiver_io.png",
        f"Perceiver IO, M={size.inputs}, N={size.num_latents} (ms, lower is better)",
        {name: (row["forward_ms"], row["train_ms"]) for name, row in result["rows"].items()},
        ("forward", "forward+backward"),
    )
    return result


def part_int8(smoke: bool, figures: Path) -> dict:
    result = bench_int8.run(bench_int8.SMOKE if smoke else bench_int8.SIZES, repeats=3)
    print(bench_int8.format_table(result))
    bar_plot(
        figures / "speed_int8.png",
        "int8 vs fp32 forward (ms, lower is better)",
        {kind: (r["fp32_ms"], r["int8_ms"]) for kind, r in result["models"].items()},
        ("fp32", "int8"),
    )
    return result


def part_scaling(smoke: bool, figures: Path) -> dict:
    """B13 in a fresh interpreter: its per-M subprocesses read ``ru_maxrss``, which Linux carries over
    ``fork`` + ``exec`` from the parent, so forking them from this (by now multi-GB) process would
    report this process's peak as theirs."""
    import subprocess

    figures_final, figures = figures, Path(tempfile.mkdtemp())  # B13 names its figure as docs/benchmarks.md does
    code = (
        "import json, sys; from pathlib import Path; from perceiver_bench.runner import run_task; "
        f"r = run_task('scaling', {'smoke' if smoke else 'full'!r}, figures_dir=Path({str(figures)!r})); "
        "print('@@RESULT@@' + json.dumps({'metric': r.metric, 'target_met': r.target_met, 'extra': r.extra, "
        "'figures': r.figures}, default=str))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    for png in figures.glob("B13-scaling-*.png"):
        shutil.copy(png, figures_final / "speed_scaling.png")
    print(proc.stdout[-4000:], flush=True)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(f"B13 scaling failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(marker[-1][len("@@RESULT@@") :])
    extra = result["extra"]
    return {
        "slope": result["metric"],
        "slope_m_ge_16k": extra.get("perceiver_slope_time_m_ge_16k"),
        "largest_m": extra.get("perceiver_largest_m"),
        "peak_rss_mb_at_largest_m": extra.get("perceiver_peak_rss_mb_at_largest_m"),
        "target_met": result["target_met"],
        "vanilla_stopped": extra.get("vanilla_stopped"),
        "vanilla_slopes": {k: v for k, v in extra.items() if k.startswith("vanilla") and k.endswith("_slope_time")},
        "measurements": extra.get("measurements"),
        "figures": result["figures"],
    }


def part_adapter(smoke: bool, _figures: Path) -> dict:
    """Headline ViT-B/32 + LM 4 x 512 (real data path, compute only, stage split), then the LM/tower sweep."""
    return bench_adapter_throughput.run_all(smoke)


def part_qlora(smoke: bool, figures: Path) -> dict:
    result = bench_qlora_memory.run(bench_qlora_memory.SMOKE if smoke else bench_qlora_memory.LM_SIZE)
    print(bench_qlora_memory.format_table(result))
    labels = {"none": "fp32", "8bit": "8-bit", "4bit": "4-bit"}
    bar_plot(
        figures / "speed_qlora.png",
        "LM memory (MiB)",
        {labels[q]: (r["total_mb"], r["train_step_peak_mb"]) for q, r in result["rows"].items()},
        ("weights", "LoRA step peak"),
    )
    return result


def part_vlm(smoke: bool, _figures: Path) -> dict:
    """The whole VLM converted from Idefics2 / IDEFICS vs the transformers model (one thread, CPU time)."""
    result = bench_vlm.run(smoke)
    print(bench_vlm.table(result))
    return result


RUNNERS = {
    "gemm": part_gemm,
    "resampler": part_resampler,
    "perceiver_io": part_perceiver_io,
    "int8": part_int8,
    "scaling": part_scaling,
    "adapter": part_adapter,
    "qlora": part_qlora,
    "vlm": part_vlm,
}


TEXT = {
    "perceiver_io": bench_perceiver_io.format_table,
    "int8": bench_int8.format_table,
    "adapter": bench_adapter_throughput.format_table,
    "qlora": bench_qlora_memory.format_table,
    "resampler": resampler_text,
    "scaling": scaling_text,
    "vlm": bench_vlm.table,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every part runs")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/speed"),
        help="speed.json, speed.md and figures/ go here (docs: --out docs)",
    )
    parser.add_argument("--merge", action="store_true", help="keep the other parts' results from an earlier speed.json")
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    texts: dict[str, str] = {}
    if args.merge and (args.out / "speed.json").exists():  # re-run some parts, keep the others' numbers
        earlier = json.loads((args.out / "speed.json").read_text())["results"]
        results = {k: v for k, v in earlier.items() if k not in args.parts}  # a re-run part's old keys may be stale
        texts = {k: TEXT[k](v) for k, v in results.items() if k in TEXT and "error" not in v}
    meta = {
        "command": "python benchmarks/speed.py"
        + (" --smoke" if args.smoke else "")
        + ("" if args.parts == PARTS else " --parts " + " ".join(args.parts))
        + (" --merge (other parts from the earlier run)" if args.merge else ""),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "smoke": args.smoke,
    }
    out: dict = {}
    for part in args.parts:
        print(f"\n===== {part}", flush=True)
        start = time.perf_counter()
        try:
            results[part] = RUNNERS[part](args.smoke, figures)
            if part in TEXT:
                texts[part] = TEXT[part](results[part])
        except Exception as err:  # one failing part must not lose the others' numbers
            traceback.print_exc()
            results[part] = {"error": f"{type(err).__name__}: {err}"}
        results[part]["wall_seconds"] = time.perf_counter() - start
        results[part]["machine"] = meta["machine"]  # merged parts keep the machine they ran on
        out = write_outputs(args.out, results, texts, meta)  # after every part: a cut-short run keeps its numbers
    print("\n===== goals")
    print(format_goals(out["goals"]))
    print(f"\nwrote {args.out / 'speed.json'}, {args.out / 'speed.md'} and {figures}/speed_*.png")
    return out


def machine() -> str:
    """CPU model and whether it has AVX-512 (the machines of this project differ: ratios only)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "")
    avx512 = "AVX-512" if " avx512f" in info else "AVX2 only" if " avx2" in info else "no AVX2"
    return f"{platform.machine()} {model} (family {family}), {avx512}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
