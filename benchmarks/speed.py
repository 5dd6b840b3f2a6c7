"""The performance suite (issue 8): every side-by-side benchmark in one run, one table, JSON + Markdown + plots.

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

Every part compares peers in the same process, interleaved (the machine is shared: ratios are the
result, absolute ms drift). The goals of issue 8 are checked at the end and marked met / MISSED.
A part that fails is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
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
from common import gemm_flops  # noqa: E402

# Ours-only parts first, the long peer comparisons after: a run cut short still has most numbers.
PARTS = ["gemm", "int8", "qlora", "adapter", "perceiver_io", "scaling", "resampler"]


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
    _bar_plot(
        figures / "speed_perceiver_io.png",
        f"Perceiver IO, M={size.inputs}, N={size.num_latents} (ms, lower is better)",
        {name: (row["forward_ms"], row["train_ms"]) for name, row in result["rows"].items()},
        ("forward", "forward+backward"),
    )
    return result


def part_int8(smoke: bool, figures: Path) -> dict:
    result = bench_int8.run(bench_int8.SMOKE if smoke else bench_int8.SIZES, repeats=3)
    print(bench_int8.format_table(result))
    _bar_plot(
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
    _bar_plot(
        figures / "speed_qlora.png",
        "LM memory (MiB)",
        {labels[q]: (r["total_mb"], r["train_step_peak_mb"]) for q, r in result["rows"].items()},
        ("weights", "LoRA step peak"),
    )
    return result


RUNNERS = {
    "gemm": part_gemm,
    "resampler": part_resampler,
    "perceiver_io": part_perceiver_io,
    "int8": part_int8,
    "scaling": part_scaling,
    "adapter": part_adapter,
    "qlora": part_qlora,
}


# ----------------------------------------------------------------------------------------- goals


def goals(results: dict) -> list[dict]:
    """(goal, measured, target, met) rows for every issue-8 goal whose part ran."""
    rows: list[dict] = []

    def add(goal: str, value: float, target: str, met: bool, note: str = "") -> None:
        rows.append({"goal": goal, "measured": value, "target": target, "met": bool(met), "note": note})

    r = results.get("resampler", {}).get("summary")
    if r:
        fwd, train = r["forward"], r["forward+backward"]
        add(
            "resampler forward, fraction of GEMM ceiling",
            fwd["ours_fraction_of_gemm"],
            ">= 0.85",
            fwd["ours_fraction_of_gemm"] >= 0.85,
            f"peers {_fmt_dict(fwd['peer_fraction_of_gemm'])}",
        )
        add(
            f"resampler fwd+bwd vs fastest peer ({train['fastest_peer']})",
            train["speedup_vs_fastest_peer"],
            ">= 1.25x",
            train["speedup_vs_fastest_peer"] >= 1.25,
            f"vs each peer {_fmt_dict(train['speedup_vs_each_peer'])}",
        )
        for mode, row in r.items():
            ratio = row.get("vs_flamingo_pytorch")
            if ratio is not None:
                alt = row.get("alternating_loop", {}).get("ours(flamingo-pytorch)")
                note = "" if alt is None else f"plain alternating loop {alt:.2f}x"
                add(f"resampler {mode} vs flamingo-pytorch (on par)", ratio, ">= 0.97x", ratio >= 0.97, note)
    p = results.get("perceiver_io", {}).get("ratios")
    if p:
        add(
            "Perceiver IO fwd+bwd vs transformers",
            p["transformers"]["train_speedup"],
            ">= 1.8x",
            p["transformers"]["train_speedup"] >= 1.8,
        )
        add(
            "Perceiver IO fwd+bwd vs perceiver-pytorch",
            p["perceiver-pytorch"]["train_speedup"],
            ">= 1.3x",
            p["perceiver-pytorch"]["train_speedup"] >= 1.3,
        )
        mem = p["transformers"].get("forward_memory_ratio_at_memory_inputs")
        if mem is not None:
            add("Perceiver IO peak memory at 256k inputs vs transformers", mem, "<= 0.5x", mem <= 0.5)
    q = results.get("int8", {}).get("models")
    if q:
        for kind, row in q.items():
            add(
                f"int8 {kind} forward vs fp32",
                row["speedup"],
                ">= 1.5x, error <= tolerance",
                row["speedup"] >= 1.5 and row["within_tolerance"],
                f"rel. error {row['relative_error']:.1e}",
            )
    s = results.get("scaling")
    if s and "slope" in s:
        gb = (s.get("peak_rss_mb_at_largest_m") or float("nan")) / 1024
        add(
            "scaling: log-log slope of encoder time vs M",
            s["slope"],
            "<= 1.1, 256k in <= 4 GB",
            s["target_met"],
            f"largest M {s.get('largest_m')}, peak RSS {gb:.2f} GB",
        )
    a = results.get("adapter")
    if a and "cached_speedup" in a:
        add(
            "adapter training: cached features vs image shards",
            a["cached_speedup"],
            ">= 5x",
            a["cached_speedup"] >= 5,
            f"{a.get('label', 'headline')}; compute only {a.get('compute_only_speedup', math.nan):.2f}x, "
            f"Amdahl bound {a.get('amdahl_bound', math.nan):.2f}x, with a free LM {a.get('free_lm_bound', math.nan):.2f}x",
        )
    lm = results.get("qlora", {}).get("rows")
    if lm:
        ratio = lm["4bit"]["total_ratio"]
        add(
            "4-bit LM weights vs fp32",
            ratio,
            "<= 0.3x",
            ratio <= 0.3,
            f"decoder linears alone {lm['4bit']['linear_ratio']:.2f}x",
        )
    return rows


def _fmt_dict(d: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


# ----------------------------------------------------------------------------------------- output


def _bar_plot(path: Path, title: str, groups: dict[str, tuple[float, float]], series: tuple[str, str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(names)), 3.6))
    width = 0.38
    for i, label in enumerate(series):
        values = [groups[n][i] for n in names]
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=10)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _goals_plot(path: Path, rows: list[dict]) -> None:
    """Measured / target per goal on one axis (>= 1 is met for 'at least' goals, <= 1 for 'at most')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for row in rows:
        target = float(row["target"].split()[1].rstrip("x,"))
        at_least = row["target"].startswith(">=")
        score = row["measured"] / target if at_least else target / max(row["measured"], 1e-9)
        labels.append(row["goal"])
        values.append(score)
        colors.append("tab:green" if row["met"] else "tab:red")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("measured vs goal (>= 1 means met)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_goals(rows: list[dict]) -> str:
    lines = [f"{'goal':58s} {'measured':>9s}  {'target':<26s} {'':6s} note"]
    for row in rows:
        lines.append(
            f"{row['goal']:58s} {row['measured']:9.3g}  {row['target']:<26s} {'met' if row['met'] else 'MISSED':6s} "
            f"{row['note']}"
        )
    return "\n".join(lines)


def write_markdown(path: Path, results: dict, goal_rows: list[dict], texts: dict[str, str], meta: dict) -> None:
    lines = [
        "# Speed and memory",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['threads']} threads, "
        f"torch {meta['torch']}; the machine was shared, so ratios measured side by side in one run are the "
        "result, absolute times drift). Re-run that command to check every number.",
        "",
        "## Goals",
        "",
        "| goal | measured | target | |",
        "|---|---|---|---|",
    ]
    for row in goal_rows:
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(
            f"| {row['goal']} | {row['measured']:.3g}{note} | {row['target']} | {'met' if row['met'] else '**missed**'} |"
        )
    gemm = results.get("gemm", {}).get("flops")
    if gemm:
        lines += ["", f"Machine limit: fp32 GEMM {gemm / 1e9:.1f} GFLOP/s (2048^3 torch.mm, best of 3 medians)."]
    for name, text in texts.items():
        lines += ["", f"## {name}", "", "```", text.strip(), "```"]
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if failed:
        lines += ["", "## Parts that failed", ""] + [f"- {k}: {v}" for k, v in failed.items()]
    figures = sorted(p.name for p in (path.parent / "figures").glob("speed_*.png"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}](figures/{f})" for f in figures]
    path.write_text("\n".join(lines) + "\n")


def _resampler_text(result: dict) -> str:
    raw = result["raw"]
    lines = [f"{'mode':18s} {'model':26s} {'ms':>9s} {'ours x':>7s} {'of GEMM':>8s} {'peak MiB':>9s}"]
    for r in raw["rows"]:
        if r.get("harness") == "alternating":
            lines.append(
                f"{r['mode']:18s} {r['model']:26s} {'':>9s} {r['speedup_vs_peer']:7.2f} (plain alternating loop)"
            )
            continue
        if "ms" not in r:
            lines.append(f"{r['mode']:18s} {'GEMM ceiling':26s} {r['flops_per_s'] / 1e9:8.1f} GFLOP/s")
            continue
        speed = f"{r['speedup_vs_peer']:.2f}" if r["speedup_vs_peer"] else ""
        lines.append(
            f"{r['mode']:18s} {r['model']:26s} {r['ms']:9.0f} {speed:>7s} {r['fraction_of_gemm']:8.0%} "
            f"{r['peak_mib']:9.0f}"
        )
    return "\n".join(lines)


def _scaling_text(result: dict) -> str:
    lines = [f"{'model':18s} {'M':>8s} {'seconds':>9s} {'fwd MiB':>9s}"]
    for r in result.get("measurements") or []:
        if "error" in r:
            lines.append(f"{r['kind']:18s} {r['length']:8d} failed: {r['error']}")
            continue
        lines.append(
            f"{r['kind']:18s} {r['length']:8d} {r['seconds']:9.3f} {r.get('forward_memory_mb', math.nan):9.0f}"
        )
    lines.append(f"Perceiver slope {result['slope']:.3f} (M >= 16k: {result['slope_m_ge_16k']})")
    for kind, reason in (result.get("vanilla_stopped") or {}).items():
        lines.append(f"{kind}: {reason}")
    return "\n".join(lines)


TEXT = {
    "perceiver_io": bench_perceiver_io.format_table,
    "int8": bench_int8.format_table,
    "adapter": bench_adapter_throughput.format_table,
    "qlora": bench_qlora_memory.format_table,
    "resampler": _resampler_text,
    "scaling": _scaling_text,
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
        results = {k: v for k, v in json.loads((args.out / "speed.json").read_text())["results"].items()}
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


def write_outputs(out_dir: Path, results: dict, texts: dict[str, str], meta: dict) -> dict:
    goal_rows = goals(results)
    meta = {**meta, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts_done": list(results)}
    out = {"meta": meta, "goals": goal_rows, "results": results}
    (out_dir / "speed.json").write_text(json.dumps(out, indent=2, default=str))
    if goal_rows:
        _goals_plot(out_dir / "figures" / "speed_goals.png", goal_rows)
    write_markdown(out_dir / "speed.md", results, goal_rows, texts, meta)
    return out


if __name__ == "__main__":
    main()
