"""Perceiver Resampler speed: ours vs flamingo-pytorch vs transformers' Idefics2, side by side, fp32 CPU.

    .venv/bin/python benchmarks/bench_resampler.py                 # Flamingo-like size, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_resampler.py --smoke         # tiny size, ~10 s (checks it runs)
    .venv/bin/python benchmarks/bench_resampler.py --json runs/bench_resampler.json
    .venv/bin/python benchmarks/bench_resampler.py --before --int8 --threads 1 --clock cpu

Size (one for all): dim 1024, depth 6, 64 latents, 8 heads x 128, FF x4, 257 patches, batch 8.
Each peer is built with random weights; ours is made from it with our converter (so ours computes the
same function: flamingo-pytorch = LayerNorm + GELU MLP; Idefics2 = RMSNorm + SwiGLU MLP), and outputs
and gradients are checked equal before timing. Forward runs under no_grad; forward+backward trains
every weight on frozen media features (the adapter setting). ``--before`` adds our resampler with the
frozen-context projection switched off (norm, then project: what `CrossAttentionBlock.project_context`
saves).

Two timing harnesses, which must agree: (1) every model warmed up ``--warmup`` times (the first steps
of a fresh process fault in new pages and run up to 3x slower), then timed round-robin A B C A B C ...;
(2) a plain alternating loop from the same warm state, ``--warmup`` rounds discarded. Medians with the
spread (max-min)/median; the ratios of both harnesses are printed side by side.

Columns: ms (median), speed-up of ours over that peer, FLOPs (counted by torch's flop formulas on
each peer and credited to ours, which runs fewer backward FLOPs), achieved FLOP/s as a fraction of this machine's
measured fp32 GEMM rate, and peak memory (torch CPU allocations seen by the profiler). Results of the
last run: docs/speed.md (resampler part).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import alternating_ms, count_flops, gemm_workload, interleaved_ms, peak_memory_mb, spread  # noqa: E402

from resampler.convert import from_flamingo_pytorch, from_idefics2  # noqa: E402


@dataclass
class Size:
    dim: int = 1024
    depth: int = 6
    num_latents: int = 64
    heads: int = 8
    head_dim: int = 128
    patches: int = 257
    batch: int = 8


SMOKE = Size(dim=64, depth=2, num_latents=8, heads=2, head_dim=32, patches=17, batch=2)


def build_peers(size: Size) -> dict[str, torch.nn.Module]:
    from flamingo_pytorch import PerceiverResampler as FlamingoResampler
    from transformers import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    torch.manual_seed(0)
    flamingo = FlamingoResampler(
        dim=size.dim,
        depth=size.depth,
        dim_head=size.head_dim,
        heads=size.heads,
        num_latents=size.num_latents,
        num_media_embeds=1,
    )
    config = Idefics2PerceiverConfig(
        hidden_size=size.dim,
        resampler_n_latents=size.num_latents,
        resampler_depth=size.depth,
        resampler_n_heads=size.heads,
        resampler_head_dim=size.head_dim,
        num_key_value_heads=size.heads,
        hidden_act="silu",
    )
    config._attn_implementation = "sdpa"
    idefics2 = Idefics2PerceiverResampler(config)
    with torch.no_grad():  # its init is ones/zeros-heavy; random values make the check meaningful
        idefics2.latents.normal_()
    return {"flamingo-pytorch": flamingo, "idefics2": idefics2}


def peer_call(name: str, model: torch.nn.Module, x: torch.Tensor):
    if name == "idefics2":
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return lambda: model(context=x, attention_mask=mask)
    return lambda: model(x)[:, 0]


def ours_call(model: torch.nn.Module, x: torch.Tensor):
    return lambda: model(x)[:, 0]


def without_frozen_context_projection(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of our resampler whose layers normalise the media, then project them (no affine folding)."""
    model = copy.deepcopy(model)
    for layer in model.layers:
        layer.project_context = types.MethodType(
            lambda self, c, key_pos=None: self.attn.project_kv(self.norm_kv(c), key_pos=key_pos), layer
        )
    return model


def forward(call):
    def run():
        with torch.no_grad():
            call()

    return run


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output (a plain sum of squares would be constant after a norm)."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return (out * weight).mean()


def forward_backward(model: torch.nn.Module, call):
    def run():
        model.zero_grad(set_to_none=True)
        loss_of(call()).backward()

    return run


def check_equal(peer, ours, peer_fn, ours_fn, tol: float) -> float:
    """Outputs and every gradient of a shared parameter (latents, final norm) agree; returns max |Δ out|."""
    out_peer, out_ours = peer_fn(), ours_fn()
    err = (out_peer - out_ours).abs().max().item()
    scale = out_peer.abs().max().item()
    if err > tol * max(scale, 1.0):
        raise AssertionError(f"outputs differ: max error {err:.3g} (scale {scale:.3g})")
    for model, out in ((peer, out_peer), (ours, out_ours)):
        model.zero_grad(set_to_none=True)
        loss_of(out).backward()
    for name in ("latents", "norm.weight"):
        g_peer, g_ours = peer.get_parameter(name).grad, ours.get_parameter(name).grad
        g_err, g_scale = (g_peer - g_ours).abs().max().item(), g_peer.abs().max().item()
        if g_err > tol * g_scale:
            raise AssertionError(f"gradient of {name} differs: {g_err:.3g} vs scale {g_scale:.3g}")
    return err


def bench_int8(model: torch.nn.Module, x: torch.Tensor, args) -> dict:
    """Our fp32 forward vs its int8 copy (resampler.quantize: per-channel int8 weights, fbgemm)."""
    from resampler.quantize import quantize_int8

    variants = {"fp32": model.eval(), "int8 per-channel": quantize_int8(model)}
    with torch.no_grad():
        ref = model(x)
        errors = {}
        for name, m in variants.items():
            out = m(x)
            errors[name] = ((out - ref).norm() / ref.norm()).item(), (out - ref).abs().max().item()
    fns = {name: forward(ours_call(m, x)) for name, m in variants.items()}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_ms(fns, warmup=args.warmup, repeats=args.repeats, clock=clock)
    print("\nint8 inference (forward, ours)")
    print(f"{'variant':<26}{'ms':>9}{'spread':>8}{'x fp32':>8}{'rel err':>9}{'max err':>9}")
    rows = []
    for name in variants:
        ms, samples = times[name]
        rel, worst = errors[name]
        speedup = times["fp32"][0] / ms
        print(f"{name:<26}{ms:>9.0f}{spread(samples):>8.0%}{speedup:>8.2f}{rel:>9.2%}{worst:>9.3f}")
        rows.append(
            {"variant": name, "ms": ms, "samples_ms": samples, "speedup": speedup, "rel_err": rel, "max_err": worst}
        )
    print(f"(errors vs fp32 outputs of max magnitude {ref.abs().max().item():.2f}; rel err = |Δ|_F / |out|_F)")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny size, to check the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (fresh pages fault)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--before", action="store_true", help="also time ours without the frozen-context projection")
    parser.add_argument("--int8", action="store_true", help="also time the int8 dynamic-quantized forward")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu = process CPU time (use with --threads 1 on a busy shared machine)",
    )
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory runs")
    parser.add_argument("--skip-fwd", action="store_true", help="only time forward+backward")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else Size()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(size.batch, size.patches, size.dim)

    peers = build_peers(size)
    converters = {"flamingo-pytorch": from_flamingo_pytorch, "idefics2": from_idefics2}
    models, calls = {}, {}
    for name, peer in peers.items():
        ours = converters[name](peer)
        models[name], models[f"ours({name})"] = peer, ours
        calls[name], calls[f"ours({name})"] = peer_call(name, peer, x), ours_call(ours, x)
        err = check_equal(peer, ours, calls[name], calls[f"ours({name})"], tol=1e-4)
        print(f"{name}: converted, outputs and gradients agree (max |Δ| {err:.2e})")
    if args.before:
        plain = without_frozen_context_projection(models["ours(flamingo-pytorch)"])
        models["before(flamingo-pytorch)"], calls["before(flamingo-pytorch)"] = plain, ours_call(plain, x)

    print(f"threads {torch.get_num_threads()}, clock {args.clock}")
    results = {"size": asdict(size), "rows": []}
    for mode in ("forward+backward",) if args.skip_fwd else ("forward", "forward+backward"):
        fns = {
            name: forward(calls[name]) if mode == "forward" else forward_backward(models[name], calls[name])
            for name in models
        }
        # Model FLOPs: counted on each peer (common.count_flops) and credited to ours too, as ours computes
        # the same function with fewer backward FLOPs (and the counter misses CPU flash attention).
        flops = {
            name: count_flops(calls[name] if mode == "forward" else fn) for name, fn in fns.items() if name in peers
        }
        for name in fns:
            flops.setdefault(name, flops[name[name.index("(") + 1 : -1]] if "(" in name else 0)
        gemm_fn, gemm_work = gemm_workload(flops["flamingo-pytorch"] / 4, n=2048 if not args.smoke else 256)
        memory = {
            name: float("nan")
            if args.no_memory
            else peak_memory_mb(fn, lambda m=models[name]: m.zero_grad(set_to_none=True))
            for name, fn in fns.items()
        }
        if args.memory_only:
            print(f"\n{mode}: peak MiB " + ", ".join(f"{n} {v:.0f}" for n, v in memory.items()))
            continue
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = interleaved_ms({"GEMM": gemm_fn, **fns}, warmup=args.warmup, repeats=args.repeats, clock=clock)
        gemm = gemm_work / (times["GEMM"][0] / 1e3)
        fastest_peer = min(times[p][0] for p in peers)
        print(f"\n{mode}  (B={size.batch}, P={size.patches}, D={size.dim}, depth={size.depth})")
        print(
            f"GEMM ceiling timed in the same round-robin: {gemm / 1e9:.1f} GFLOP/s (spread {spread(times['GEMM'][1]):.0%})"
        )
        print(f"{'model':<26}{'ms':>9}{'spread':>8}{'ours x':>8}{'GFLOP':>8}{'of GEMM':>9}{'peak MiB':>10}")
        results["rows"].append({"mode": mode, "model": "GEMM", "flops_per_s": gemm, "samples_ms": times["GEMM"][1]})
        for name in fns:
            ms, samples = times[name]
            peer = name[name.index("(") + 1 : -1] if "(" in name else None
            speedup = f"{times[peer][0] / ms:.2f}" if peer else ""
            frac = flops[name] / (ms / 1e3) / gemm
            print(
                f"{name:<26}{ms:>9.0f}{spread(samples):>8.0%}{speedup:>8}{flops[name] / 1e9:>8.1f}"
                f"{frac:>9.0%}{memory[name]:>10.0f}"
            )
            results["rows"].append(
                {
                    "mode": mode,
                    "model": name,
                    "ms": ms,
                    "samples_ms": samples,
                    "speedup_vs_peer": times[peer][0] / ms if peer else None,
                    "flops": flops[name],
                    "fraction_of_gemm": frac,
                    "peak_mib": memory[name],
                }
            )
        ours_best = times["ours(flamingo-pytorch)"][0]
        print(f"ours(flamingo-pytorch) vs the fastest peer: {fastest_peer / ours_best:.2f}x")
        loop = alternating_ms(fns, warmup=args.warmup, repeats=args.repeats, clock=clock)
        print("second harness, a plain alternating loop: ours x (round-robin harness's ratio, spreads)")
        for name in fns:
            peer = name[name.index("(") + 1 : -1] if "(" in name else None
            if peer:
                ratio, first = loop[peer][0] / loop[name][0], times[peer][0] / times[name][0]
                noise = max(spread(loop[name][1]), spread(loop[peer][1]))
                print(f"  {name:<26}{ratio:>6.2f}x  ({first:.2f}x, spread {noise:.0%})")
                results["rows"].append(
                    {"mode": mode, "model": name, "harness": "alternating", "speedup_vs_peer": ratio, "spread": noise}
                )
    if args.int8:
        results["int8"] = bench_int8(models["ours(flamingo-pytorch)"], x, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
