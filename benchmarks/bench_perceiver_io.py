"""Perceiver IO speed and memory: ours vs transformers' PerceiverModel vs perceiver-pytorch, side by side, fp32 CPU.

    .venv/bin/python benchmarks/bench_perceiver_io.py            # ImageNet-like: 50,176 inputs, 512 latents, ~6 min
    .venv/bin/python benchmarks/bench_perceiver_io.py --smoke    # tiny sizes, ~15 s (checks it runs)
    .venv/bin/python benchmarks/bench_perceiver_io.py --json docs/bench_perceiver_io.json

One shared shape for every model: M inputs of C=261 channels (3 pixels + 258 Fourier features, as the
ImageNet Perceiver), 512 latents x 512, one cross-attend with 1 head (qk = v = C, DeepMind's 'kv' shape),
4 latent self-attention layers with 8 heads, batch 1. The two peers differ in kind (HF: GELU MLP, q/k/v
biases, a classification decoder; perceiver-pytorch: GEGLU MLP x4, no biases, returns the latents), so
each peer gets its own copy of ours made by our converter (`from_hf_perceiver`, `from_perceiver_pytorch`),
and outputs and input gradients are checked equal at a small M before anything is timed. One more copy
of ours with keys and values projected from the 50k inputs (as the peers do) shows what attending in the
inputs' own space (`resampler.nn.folded`) buys.

Timed round-robin in one process (the machine is shared): forward (no_grad) and forward+backward (all
weights trainable; the inputs are pixels + Fourier features, so no input gradient unless --input-grad), medians of ``--repeats`` with the spread (max-min)/median. Peak memory:
torch CPU allocations seen by the profiler during one forward at ``--memory-inputs`` (262,144) inputs,
and one forward+backward at M.

Results of the last run: docs/speed.md (perceiver_io part).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_ms, peak_memory_mb, report, spread  # noqa: E402

from resampler.convert import from_hf_perceiver  # noqa: E402
from resampler.convert.perceiver_pytorch import from_perceiver_pytorch  # noqa: E402
from resampler.nn.attention import Attention  # noqa: E402
from resampler.nn.blocks import CrossAttentionBlock  # noqa: E402


@dataclass
class Size:
    inputs: int = 50_176  # 224 x 224 pixels
    input_dim: int = 261
    num_latents: int = 512
    latent_dim: int = 512
    self_attends: int = 4
    self_heads: int = 8
    batch: int = 1
    memory_inputs: int = 262_144
    check_inputs: int = 2048
    num_labels: int = 1000


SMOKE = Size(
    inputs=1024, input_dim=24, num_latents=16, latent_dim=32, self_attends=1, memory_inputs=4096, check_inputs=64
)


def build_hf(size: Size) -> torch.nn.Module:
    from transformers import PerceiverConfig
    from transformers.models.perceiver import modeling_perceiver as hf

    config = PerceiverConfig(
        num_latents=size.num_latents,
        d_latents=size.latent_dim,
        d_model=size.input_dim,
        num_blocks=1,
        num_self_attends_per_block=size.self_attends,
        num_self_attention_heads=size.self_heads,
        num_cross_attention_heads=1,
        num_labels=size.num_labels,
        attention_probs_dropout_prob=0.0,
    )
    decoder = hf.PerceiverClassificationDecoder(
        config,
        num_channels=config.d_latents,
        trainable_position_encoding_kwargs={"num_channels": config.d_latents, "index_dims": 1},
        use_query_residual=True,
    )
    torch.manual_seed(0)
    return hf.PerceiverModel(config, decoder=decoder).eval()


def build_lucidrains(size: Size) -> torch.nn.Module:
    from perceiver_pytorch import PerceiverIO

    torch.manual_seed(0)
    return PerceiverIO(
        depth=size.self_attends,
        dim=size.input_dim,
        queries_dim=size.latent_dim,
        num_latents=size.num_latents,
        latent_dim=size.latent_dim,
        cross_heads=1,
        latent_heads=size.self_heads,
        cross_dim_head=size.input_dim,
        latent_dim_head=size.latent_dim // size.self_heads,
    ).eval()


def hf_call(model: torch.nn.Module):
    return lambda x: model(inputs=x).logits


def projected_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose folded cross-attends project their inputs to keys/values instead (same weights)."""
    model = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, CrossAttentionBlock) and block.fold:
            attn = block.attn
            plain = Attention(attn.q_dim, attn.kv_dim, attn.spec, out_dim=attn.out_dim)
            plain.load_state_dict(attn.state_dict())
            block.attn, block.fold = plain, False
    return model


def build_all(size: Size) -> dict[str, tuple[torch.nn.Module, object]]:
    """name -> (module, call(inputs) -> output tensor)."""
    hf = build_hf(size)
    lucid = build_lucidrains(size)
    ours_hf = from_hf_perceiver(hf).eval()
    ours_lucid = from_perceiver_pytorch(lucid).eval()
    projected = projected_copy(ours_hf)
    return {
        "transformers": (hf, hf_call(hf)),
        "ours (as transformers)": (ours_hf, ours_hf),
        "ours, K/V projected (before)": (projected, projected),
        "perceiver-pytorch": (lucid, lucid),
        "ours (as perceiver-pytorch)": (ours_lucid, ours_lucid),
    }


PAIRS = [("ours (as transformers)", "transformers"), ("ours (as perceiver-pytorch)", "perceiver-pytorch")]


def check_parity(models: dict, size: Size) -> dict[str, dict[str, float]]:
    """Max |ours - peer| of outputs and of input gradients at a small M, before timing anything."""
    torch.manual_seed(1)
    x = torch.randn(2, size.check_inputs, size.input_dim)
    report = {}
    for ours_name, peer_name in PAIRS:
        results = []
        for name in (ours_name, peer_name):
            xi = x.clone().requires_grad_(True)
            out = models[name][1](xi)
            out.square().mean().backward()
            results.append((out.detach(), xi.grad))
            models[name][0].zero_grad(set_to_none=True)
        out_err = (results[0][0] - results[1][0]).abs().max().item()
        grad_err = (results[0][1] - results[1][1]).abs().max().item()
        scale = results[1][0].abs().max().item()
        if out_err > 1e-4 * max(1.0, scale):
            raise AssertionError(f"{ours_name} vs {peer_name}: outputs differ by {out_err:.2e}")
        report[peer_name] = {"max_abs_err_out": out_err, "max_abs_err_input_grad": grad_err}
    return report


def forward_fn(call, x):
    def run():
        with torch.no_grad():
            call(x)

    return run


def train_fn(module, call, x):
    def run():
        out = call(x)
        out.square().mean().backward()
        module.zero_grad(set_to_none=True)
        if x.requires_grad:
            x.grad = None

    return run


def run(
    size: Size,
    repeats: int = 3,
    warmup: int = 2,
    memory: bool = True,
    input_grad: bool = False,
    clock=time.perf_counter,
) -> dict:
    """``clock=time.process_time`` with one torch thread counts only this process's CPU time (a shared machine)."""
    models = build_all(size)
    parity = check_parity(models, size)
    torch.manual_seed(2)
    x = torch.randn(size.batch, size.inputs, size.input_dim)
    xg = x.clone().requires_grad_(input_grad)
    timed = {"warmup": warmup, "repeats": repeats, "clock": clock}
    forward = interleaved_ms({n: forward_fn(c, x) for n, (m, c) in models.items()}, **timed)
    train = interleaved_ms({n: train_fn(m, c, xg) for n, (m, c) in models.items()}, **timed)
    rows = {}
    for name in models:
        rows[name] = {
            "forward_ms": forward[name][0],
            "forward_spread": spread(forward[name][1]),
            "train_ms": train[name][0],
            "train_spread": spread(train[name][1]),
        }
    if memory:
        big = torch.randn(size.batch, size.memory_inputs, size.input_dim)
        for name, (module, call) in models.items():
            rows[name]["train_peak_mb"] = peak_memory_mb(train_fn(module, call, xg))
            rows[name]["forward_peak_mb_at_memory_inputs"] = peak_memory_mb(forward_fn(call, big))
        del big
    ratios = {}
    for ours_name, peer_name in PAIRS:
        ours, peer = rows[ours_name], rows[peer_name]
        ratios[peer_name] = {
            "forward_speedup": peer["forward_ms"] / ours["forward_ms"],
            "train_speedup": peer["train_ms"] / ours["train_ms"],
        }
        if memory:
            ratios[peer_name]["forward_memory_ratio_at_memory_inputs"] = (
                ours["forward_peak_mb_at_memory_inputs"] / peer["forward_peak_mb_at_memory_inputs"]
            )
            ratios[peer_name]["train_memory_ratio"] = ours["train_peak_mb"] / peer["train_peak_mb"]
    return {
        "size": asdict(size),
        "threads": torch.get_num_threads(),
        "input_grad": input_grad,
        "parity": parity,
        "rows": rows,
        "ratios": ratios,
    }


def format_table(result: dict) -> str:
    lines = [
        f"Perceiver IO, M={result['size']['inputs']}, N={result['size']['num_latents']}, "
        f"batch {result['size']['batch']}, fp32, {result['threads']} threads, fwd+bwd "
        f"{'with' if result['input_grad'] else 'without'} input gradient",
        f"{'model':30s} {'fwd ms':>9s} {'spread':>7s} {'fwd+bwd ms':>11s} {'spread':>7s} {'train MiB':>10s} "
        f"{'fwd MiB @' + str(result['size']['memory_inputs']):>16s}",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"{name:30s} {row['forward_ms']:9.1f} {row['forward_spread']:7.2f} {row['train_ms']:11.1f} "
            f"{row['train_spread']:7.2f} {row.get('train_peak_mb', float('nan')):10.0f} "
            f"{row.get('forward_peak_mb_at_memory_inputs', float('nan')):16.0f}"
        )
    for peer, r in result["ratios"].items():
        mem = r.get("forward_memory_ratio_at_memory_inputs", float("nan"))
        err = result["parity"][peer]
        lines.append(
            f"ours vs {peer}: forward {r['forward_speedup']:.2f}x, fwd+bwd {r['train_speedup']:.2f}x, "
            f"forward memory {mem:.2f}x (parity: out {err['max_abs_err_out']:.1e}, "
            f"input grad {err['max_abs_err_input_grad']:.1e})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=None, help="override M")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--input-grad", action="store_true", help="fwd+bwd also computes the inputs' gradient")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu = process CPU time")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else Size()
    if args.inputs:
        size.inputs = args.inputs
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    result = run(size, repeats=args.repeats, memory=not args.no_memory, input_grad=args.input_grad, clock=clock)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
