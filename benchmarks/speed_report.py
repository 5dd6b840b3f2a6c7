"""The performance suite's report: the issues' goals checked against the results, the Markdown page and
the figures (`benchmarks/speed.py` runs the parts and calls `write_outputs` after each)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def goals(results: dict) -> list[dict]:
    """(goal, measured, target, met) rows for every goal (issues 8 and 19) whose part ran."""
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
        # issue 19: the goal is at a ViT-L-14-sized tower (the sweep's row); the smaller towers show where it stops
        big = next((row for row in a.get("sweep", []) if row["size"]["tower"] == "ViT-L-14"), None)
        row = big or a
        add(
            "adapter training: cached features vs image shards",
            row["cached_speedup"],
            ">= 5x",
            row["cached_speedup"] >= 5,
            f"{row.get('label', 'headline')}; Amdahl bound {row.get('amdahl_bound', math.nan):.2f}x; at "
            f"{a.get('label')}: {a['cached_speedup']:.2f}x (compute only {a.get('compute_only_speedup', math.nan):.2f}x)",
        )
    for name, row in results.get("vlm", {}).get("rows", {}).items():
        peer = {"idefics2": "Idefics2", "idefics": "IDEFICS"}.get(name, name)
        t, g = row["train"], row["generate"]
        add(
            f"VLM training step vs {peer} ({row['mode']})",
            t["speedup"],
            ">= 1.3x",
            t["speedup"] >= 1.3,
            f"bound with a free connector {t['bound']:.2f}x, with the connector at the GEMM rate "
            f"{max(t['ceiling_bound'], t['speedup']):.2f}x",
        )
        add(f"VLM training peak memory vs {peer}", t["memory_ratio"], "<= 0.8x", t["memory_ratio"] <= 0.8)
        add(
            f"VLM generation tokens/s vs {peer} generate",
            g["speedup"],
            ">= 1.2x, identical tokens",
            g["speedup"] >= 1.2 and g["identical"],
            f"identical tokens: {g['identical']}; bound with decoding at the GEMM rate {g['ceiling_bound']:.2f}x",
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


def bar_plot(path: Path, title: str, groups: dict[str, tuple[float, float]], series: tuple[str, str]) -> None:
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
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}, torch {meta['torch']}). "
        "Each part names the machine it ran on; these machines are shared and differ, so ratios measured "
        "side by side in one run are the result and absolute times drift. Re-run that command to check "
        "every number.",
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
    gemm = results.get("gemm", {})
    if gemm.get("flops"):
        lines += [
            "",
            f"Machine limit: fp32 GEMM {gemm['flops'] / 1e9:.1f} GFLOP/s (2048^3 torch.mm, best of 3 medians; "
            f"{gemm.get('machine', 'machine not recorded')}).",
        ]
    for name, text in texts.items():
        where = results.get(name, {}).get("machine", "not recorded (run before 2026-12-04)")
        lines += ["", f"## {name}", "", f"Machine: {where}.", "", "```", text.strip(), "```"]
    failed = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if failed:
        lines += ["", "## Parts that failed", ""] + [f"- {k}: {v}" for k, v in failed.items()]
    figures = sorted(p.name for p in (path.parent / "figures").glob("speed_*.png"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}](figures/{f})" for f in figures]
    path.write_text("\n".join(lines) + "\n")


def resampler_text(result: dict) -> str:
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


def scaling_text(result: dict) -> str:
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


def write_outputs(out_dir: Path, results: dict, texts: dict[str, str], meta: dict) -> dict:
    goal_rows = goals(results)
    meta = {**meta, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts_done": list(results)}
    out = {"meta": meta, "goals": goal_rows, "results": results}
    (out_dir / "speed.json").write_text(json.dumps(out, indent=2, default=str))
    if goal_rows:
        _goals_plot(out_dir / "figures" / "speed_goals.png", goal_rows)
    write_markdown(out_dir / "speed.md", results, goal_rows, texts, meta)
    return out
