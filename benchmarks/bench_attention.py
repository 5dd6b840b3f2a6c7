"""Attention: SDPA fast path vs the plain reference path, forward+backward, side by side in one run.

    .venv/bin/python benchmarks/bench_attention.py                 # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_attention.py --inputs 200704 # longer context

A Perceiver-sized cross-attention: 512 latents (1024 wide) attend to M inputs (261 channels: RGB +
2-D Fourier features with 64 bands), one head of 1024 as in the ImageNet Perceiver, batch 1. The
paper's M is 50,176 (224 x 224); the default here is that size. Prints median ms, the ratio, and the
peak memory of each path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_ms, peak_memory_mb, spread  # noqa: E402

from resampler import Attention, AttentionSpec  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--latent-dim", type=int, default=1024)
    parser.add_argument("--inputs", type=int, default=50_176)
    parser.add_argument("--input-dim", type=int, default=261)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    head_dim = args.latent_dim // args.heads
    spec = AttentionSpec(heads=args.heads, head_dim=head_dim, qkv_bias=True)
    attns = {
        True: Attention(args.latent_dim, args.input_dim, spec),
        False: Attention(args.latent_dim, args.input_dim, spec.replace(use_sdpa=False)),
    }
    attns[False].load_state_dict(attns[True].state_dict())
    latents = torch.randn(1, args.latents, args.latent_dim, requires_grad=True)
    inputs = torch.randn(1, args.inputs, args.input_dim)
    mask = torch.ones(1, args.inputs, dtype=torch.bool)
    mask[:, -args.inputs // 10 :] = False  # 10% padding, so the masked kernels run

    def step(use_sdpa: bool):
        def run():
            attns[use_sdpa].zero_grad(set_to_none=True)
            latents.grad = None
            attns[use_sdpa](latents, inputs, mask).sum().backward()

        return run

    with torch.no_grad():
        diff = (attns[True](latents, inputs, mask) - attns[False](latents, inputs, mask)).abs().max().item()
    fns = {"sdpa": step(True), "reference": step(False)}
    times = interleaved_ms(fns, warmup=1, repeats=args.repeats)
    memory = {name: peak_memory_mb(fn) for name, fn in fns.items()}
    print(
        f"Attention forward+backward: {args.latents} latents x {args.inputs} inputs, "
        f"q_dim {args.latent_dim}, kv_dim {args.input_dim}, {args.heads} head(s); max |sdpa - reference| = {diff:.1e}"
    )
    print(f"{'path':<10} {'ms':>10} {'spread':>8} {'peak MiB':>10}")
    for name in fns:
        ms, samples = times[name]
        print(f"{name:<10} {ms:>10.1f} {spread(samples):>8.0%} {memory[name]:>10.0f}")
    ratio = times["reference"][0] / times["sdpa"][0]
    mem_ratio = memory["reference"] / max(memory["sdpa"], 1e-9)
    print(f"sdpa is {ratio:.2f}x faster and uses {mem_ratio:.1f}x less peak memory than the reference path")


if __name__ == "__main__":
    main()
