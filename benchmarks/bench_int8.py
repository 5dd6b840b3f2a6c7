"""Int8 inference (resampler.quantize) vs fp32: forward speed and output error, side by side, CPU.

    .venv/bin/python benchmarks/bench_int8.py             # Flamingo-size resampler + ImageNet-like encoder, ~3 min
    .venv/bin/python benchmarks/bench_int8.py --smoke     # tiny sizes, seconds
    .venv/bin/python benchmarks/bench_int8.py --json docs/bench_int8.json

Models (random weights, norms randomised so their affine matters):
- resampler: dim 1024, depth 6, 64 latents, 8 x 128 heads, 257 patches, batch 8 (bench_resampler's size);
- Perceiver encoder: 50,176 inputs x 261 channels, 512 latents x 512, 1 cross head, 4 self-attends x 8
  heads, batch 1 (bench_perceiver_io's size).
fp32 and int8 forwards (no_grad) are timed round-robin in one process; medians with the spread. The
error is max |int8 - fp32| / max |fp32| of the outputs; the stated bound is INT8_TOLERANCE (0.05).

The encoder's cross-attend attends in the inputs' own space (`resampler.nn.folded`): its attention over
50k inputs, fp32 in both copies, is most of its time, so int8 Linears gain little there. Results of the
last run: docs/speed.md (int8 part).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_ms, report, spread  # noqa: E402

from resampler.models.perceiver import PerceiverEncoder, PerceiverEncoderConfig  # noqa: E402
from resampler.models.resampler import PerceiverResampler, ResamplerConfig  # noqa: E402
from resampler.quantize import INT8_TOLERANCE, quantize_int8  # noqa: E402

SIZES = {
    "resampler": {"dim": 1024, "depth": 6, "num_latents": 64, "heads": 8, "head_dim": 128, "patches": 257, "batch": 8},
    "encoder": {"inputs": 50_176, "input_dim": 261, "num_latents": 512, "latent_dim": 512, "self_attends": 4},
}
SMOKE = {
    "resampler": {"dim": 64, "depth": 2, "num_latents": 8, "heads": 2, "head_dim": 32, "patches": 17, "batch": 2},
    "encoder": {"inputs": 512, "input_dim": 24, "num_latents": 16, "latent_dim": 32, "self_attends": 1},
}


def _randomise_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)


def build(kind: str, s: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "resampler":
        config = ResamplerConfig(
            dim=s["dim"], depth=s["depth"], num_latents=s["num_latents"], heads=s["heads"], head_dim=s["head_dim"]
        )
        model = PerceiverResampler(config)
        x = torch.randn(s["batch"], s["patches"], s["dim"])
    else:
        config = PerceiverEncoderConfig(
            input_dim=s["input_dim"],
            num_latents=s["num_latents"],
            latent_dim=s["latent_dim"],
            num_self_attends_per_block=s["self_attends"],
            cross_heads=1,
            self_heads=8,
        )
        model = PerceiverEncoder(config)
        x = torch.randn(1, s["inputs"], s["input_dim"])
    _randomise_norms(model)
    return model.eval(), x


def forward(model: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            return model(x)

    return run


def run(sizes: dict, repeats: int = 3, warmup: int = 1) -> dict:
    results = {"tolerance": INT8_TOLERANCE, "threads": torch.get_num_threads(), "models": {}}
    for kind, s in sizes.items():
        model, x = build(kind, s)
        fast = quantize_int8(model)
        err = ((forward(fast, x)() - forward(model, x)()).abs().max() / forward(model, x)().abs().max()).item()
        times = interleaved_ms({"fp32": forward(model, x), "int8": forward(fast, x)}, warmup=warmup, repeats=repeats)
        results["models"][kind] = {
            "size": s,
            "fp32_ms": times["fp32"][0],
            "fp32_spread": spread(times["fp32"][1]),
            "int8_ms": times["int8"][0],
            "int8_spread": spread(times["int8"][1]),
            "speedup": times["fp32"][0] / times["int8"][0],
            "relative_error": err,
            "within_tolerance": err <= INT8_TOLERANCE,
        }
    return results


def format_table(result: dict) -> str:
    lines = [
        f"int8 vs fp32 forward, {result['threads']} threads (error bound {result['tolerance']})",
        f"{'model':12s} {'fp32 ms':>9s} {'int8 ms':>9s} {'speed-up':>9s} {'rel. error':>11s}",
    ]
    for kind, r in result["models"].items():
        lines.append(
            f"{kind:12s} {r['fp32_ms']:9.1f} {r['int8_ms']:9.1f} {r['speedup']:8.2f}x {r['relative_error']:11.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(SMOKE if args.smoke else SIZES, repeats=args.repeats)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
