"""One command for a CUDA machine: what only a GPU runs, and how fast (at most ~8 minutes on one GPU).

    .venv/bin/python benchmarks/gpu_check.py             # CUDA: the full check; no CUDA: says so, tiny dry run, exit 0
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # the tiny dry run on the CPU (what the tests run, ~1 min)
    .venv/bin/python benchmarks/gpu_check.py --json runs/gpu_check.json

Run after ``bash scripts/install.sh`` (torch's CUDA wheel, bitsandbytes with its CUDA kernels). Sections,
each timed and reported even when another fails (the exit code is 1 if any failed):

  train        bf16 steps (``train.precision=bf16``, `vlm.training.train`) of the VLM, prefix and
               cross_attention: a ViT-B-16-sized open_clip tower (random weights) -> resampler (64
               latents) -> a random-init Llama of ~0.5B parameters with LoRA r=16; samples/s, tokens/s,
               peak GPU memory
  qlora        the same in prefix mode with that LM saved and reloaded through ``from_pretrained`` in
               bitsandbytes 4-bit nf4 (bf16 compute, bf16 quant storage)
  generate     batched greedy generation, tokens/s (every sample forced to the same length)
  sdpa         which scaled-dot-product kernels one training step of each part actually ran (profiler)
  precision    the loss of one batch in fp32 vs under bf16 autocast, same weights
  resampler    ours vs flamingo-pytorch vs Idefics2 (benchmarks/bench_resampler.py's peers and converters)
  perceiver_io ours vs transformers vs perceiver-pytorch (benchmarks/bench_perceiver_io.py's models)

The dry run is the same code at tiny sizes on the CPU (bf16 autocast included, the CPU 4-bit kernels of
bitsandbytes for the qlora section): only the CUDA calls (``synchronize``, memory statistics, moving
to the GPU) are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_ms  # noqa: E402


@dataclass(frozen=True)
class Plan:
    device: str = "cuda"
    tower: str = "ViT-B-16"  # open_clip name, random weights (pretrained=None)
    lm: tuple = (("hidden_size", 1280), ("num_hidden_layers", 16), ("num_attention_heads", 20),
                 ("num_key_value_heads", 20), ("intermediate_size", 5120), ("vocab_size", 32000))  # fmt: skip
    latents: int = 64
    xattn_every: int = 4
    batch: int = 16
    warmup_steps: int = 5
    timed_steps: int = 20
    new_tokens: int = 32
    bench_size: str = "full"  # bench_resampler / bench_perceiver_io size
    repeats: int = 5


DRY = Plan(
    device="cpu",
    tower="",  # the tests' tiny ViT
    lm=(("hidden_size", 64), ("num_hidden_layers", 2), ("num_attention_heads", 4), ("intermediate_size", 128)),
    latents=8,
    xattn_every=1,
    batch=2,
    warmup_steps=1,
    timed_steps=2,
    new_tokens=4,
    bench_size="smoke",
    repeats=1,
)
CAPTION = "a small red circle on the left and a large blue square on the right"


# ----------------------------------------------------------------------------------------------
# Helpers that differ between CUDA and CPU: the only GPU-specific calls of the script


def sync(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def reset_peak(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(plan: Plan) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else None


# ----------------------------------------------------------------------------------------------
# The VLM


def tower(plan: Plan):
    import open_clip

    from vlm.config import VisionConfig
    from vlm.testing import register_tiny_clip

    name = plan.tower or register_tiny_clip()
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return clip.to(plan.device).eval(), preprocess, VisionConfig(name=name, pretrained=None)


def vlm_config(plan: Plan, mode: str, vision, lm=None):
    from vlm.config import InjectionConfig, LMConfig, LoRAConfig, ResamplerConfig, VLMConfig

    hidden = dict(plan.lm)["hidden_size"]
    injection = InjectionConfig(mode=mode, every_k_layers=plan.xattn_every, xattn_heads=max(1, hidden // 64))
    return VLMConfig(
        vision=vision,
        resampler=ResamplerConfig(depth=2, num_latents=plan.latents, heads=8, head_dim=64),
        lora=LoRAConfig(r=16, alpha=32, dropout=0.0),
        lm=lm or LMConfig(name_or_path="random-init llama"),
        injection=injection,
        caption_prompt="Caption:",
    )


def build_vlm(plan: Plan, mode: str):
    """The VLM over a random-init fp32 Llama of the plan's size (trained with bf16 autocast)."""
    from vlm.model import VisionLanguageModel
    from vlm.testing import tiny_lm, tiny_tokenizer

    clip, preprocess, vision = tower(plan)
    tokenizer = tiny_tokenizer()
    with torch.device(plan.device):
        lm = tiny_lm("llama", tokenizer, **dict(plan.lm))
    torch.manual_seed(1)
    return VisionLanguageModel.from_parts(clip, lm, tokenizer, vlm_config(plan, mode, vision), preprocess=preprocess)


def build_qlora_vlm(plan: Plan, folder: Path):
    """The same LM saved, then loaded by ``from_pretrained`` in 4-bit (the ``lm.quantization`` path)."""
    from vlm.config import LMConfig
    from vlm.model import VisionLanguageModel
    from vlm.testing import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_lm("llama", tokenizer, **dict(plan.lm)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = LMConfig(name_or_path=str(folder), dtype="bfloat16", quantization="4bit", bnb_4bit_quant_storage="bfloat16")
    clip, preprocess, vision = tower(plan)
    torch.manual_seed(1)
    model = VisionLanguageModel(vlm_config(plan, "prefix", vision, lm), vision_model=clip, preprocess=preprocess)
    return model


def batches(model, plan: Plan, n: int) -> list[dict]:
    """``n`` batches of random images (the tower's size) and one caption each."""
    prompt = "Caption:" if model.config.injection.mode == "prefix" else "<image>Caption:"
    h, w = model.vision.image_size
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        text = model.processor([prompt] * plan.batch, captions=[CAPTION] * plan.batch, num_images=1)
        out.append({"images": torch.randn(plan.batch, 3, h, w, generator=gen), **text})
    return out


def train_section(plan: Plan, model) -> dict:
    """bf16 training steps through the library's loop; throughput from its per-step log."""
    from vlm.training import TrainConfig, train

    steps = plan.warmup_steps + plan.timed_steps
    data = batches(model, plan, 2)
    tokens = int(data[0]["attention_mask"].sum()) // plan.batch
    config = TrainConfig(max_steps=steps, precision="bf16", lr=1e-4, lora_lr=1e-4, progress=False, tensorboard=False,
                         plot=False, log_every=1)  # fmt: skip
    reset_peak(plan)
    with tempfile.TemporaryDirectory() as out:
        result = train(model, data, config, out)
    sync(plan)
    rates = [row["samples_per_s"] for row in result.history[plan.warmup_steps :]]
    samples_per_s = statistics.median(rates)
    return {
        "lm_params_m": sum(p.numel() for p in model.language_model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens,
        "tokens_per_sample": tokens,
        "peak_gib": peak_gib(plan),
        "loss_first_last": [result.losses[0], result.losses[-1]],
    }


def generate_section(plan: Plan, model) -> dict:
    images = batches(model, plan, 1)[0]["images"]
    run = dict(max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens)  # every sample as long
    with torch.autocast(plan.device, dtype=torch.bfloat16):
        model.generate(images[:2], "Caption:", **run)  # warm-up
        sync(plan)
        start = time.perf_counter()
        model.generate(images, "Caption:", **run)
        sync(plan)
    seconds = time.perf_counter() - start
    return {"batch": plan.batch, "new_tokens": plan.new_tokens, "tokens_per_s": plan.batch * plan.new_tokens / seconds}


def sdpa_section(plan: Plan, model) -> dict:
    """The attention kernels one bf16 forward+backward of each part ran, from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    batch = {k: v.to(plan.device) for k, v in batches(model, plan, 1)[0].items()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])
    with profile(activities=activities) as prof, torch.autocast(plan.device, dtype=torch.bfloat16):
        model(**batch).loss.backward()
    sync(plan)
    model.zero_grad(set_to_none=True)
    names = {e.name for e in prof.events()}
    seen = sorted(n for n in names if "scaled_dot_product" in n or "flash" in n.lower() or "fmha" in n.lower())
    return {"kernels": seen, "lm_attn_implementation": model.language_model.config._attn_implementation}


def precision_section(plan: Plan, model) -> dict:
    batch = {k: v.to(plan.device) for k, v in batches(model, plan, 1)[0].items()}
    with torch.no_grad():
        fp32 = model(**batch).loss.item()
        with torch.autocast(plan.device, dtype=torch.bfloat16):
            bf16 = model(**batch).loss.item()
    return {"fp32": fp32, "bf16": bf16, "relative_difference": abs(bf16 - fp32) / abs(fp32)}


# ----------------------------------------------------------------------------------------------
# The connectors side by side with their peers (models and converters of the CPU benchmarks)


def timed(plan: Plan, fns: dict) -> dict[str, float]:
    """Median ms of each function, round-robin, with the device synchronised around every call."""

    def synced(fn):
        def run():
            fn()
            sync(plan)

        return run

    times = interleaved_ms({k: synced(f) for k, f in fns.items()}, warmup=2, repeats=plan.repeats)
    return {name: ms for name, (ms, _) in times.items()}


def fwd_bwd(module, call):
    def run():
        module.zero_grad(set_to_none=True)
        call().float().square().mean().backward()

    return run


def resampler_section(plan: Plan) -> dict:
    import bench_resampler as br

    size = br.SMOKE if plan.bench_size == "smoke" else br.Size()
    converters = {"flamingo-pytorch": br.from_flamingo_pytorch, "idefics2": br.from_idefics2}
    x = torch.randn(size.batch, size.patches, size.dim, device=plan.device)
    calls, modules, errors = {}, {}, {}
    for name, peer in br.build_peers(size).items():
        ours = converters[name](peer).to(plan.device)
        peer = peer.to(plan.device)
        calls[name], calls[f"ours({name})"] = br.peer_call(name, peer, x), br.ours_call(ours, x)
        modules[name], modules[f"ours({name})"] = peer, ours
        with torch.no_grad():
            errors[name] = (calls[name]() - calls[f"ours({name})"]()).abs().max().item()
    forward = timed(plan, {n: br.forward(c) for n, c in calls.items()})
    train = timed(plan, {n: fwd_bwd(modules[n], c) for n, c in calls.items()})
    return {"size": asdict(size), "max_abs_diff": errors, "forward_ms": forward, "fwd_bwd_ms": train}


def perceiver_io_section(plan: Plan) -> dict:
    import bench_perceiver_io as bp

    size = bp.SMOKE if plan.bench_size == "smoke" else bp.Size()
    models = bp.build_all(size)
    parity = bp.check_parity(models, size)  # on the CPU, before anything moves
    x = torch.randn(size.batch, size.inputs, size.input_dim, device=plan.device)
    for module, _ in models.values():
        module.to(plan.device)
    forward = timed(plan, {n: bp.forward_fn(c, x) for n, (m, c) in models.items()})
    train = timed(plan, {n: bp.train_fn(m, c, x) for n, (m, c) in models.items()})
    return {"size": asdict(size), "parity": parity, "forward_ms": forward, "fwd_bwd_ms": train}


# ----------------------------------------------------------------------------------------------


def run(plan: Plan) -> dict:
    results: dict[str, dict] = {}
    start = time.perf_counter()

    def section(name: str, fn, *args) -> None:
        began = time.perf_counter()
        try:
            results[name] = fn(*args)
        except Exception as err:  # report it and go on: one broken part must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = round(time.perf_counter() - began, 1)
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: {_brief(results[name])}", flush=True)

    for mode in ("prefix", "cross_attention"):
        model = build_vlm(plan, mode)
        section(f"train/{mode}", train_section, plan, model)
        if mode == "prefix":
            section("generate", generate_section, plan, model)
            section("sdpa", sdpa_section, plan, model)
            section("precision", precision_section, plan, model)
        del model
    with tempfile.TemporaryDirectory() as folder:
        section("qlora", lambda: train_section(plan, build_qlora_vlm(plan, Path(folder))))
    section("resampler", resampler_section, plan)
    section("perceiver_io", perceiver_io_section, plan)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    return results


def _brief(result: dict) -> str:
    if "error" in result:
        return "FAILED " + result["error"][:300]
    keys = ("samples_per_s", "tokens_per_s", "peak_gib", "kernels", "relative_difference", "forward_ms")
    return ", ".join(f"{k}={_fmt(result[k])}" for k in keys if k in result) or "ok"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, whatever the machine")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("gpu_check: no CUDA device here; running the tiny CPU dry run of the same code instead")
        plan = DRY
    else:
        plan = Plan()
        print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    results = {"plan": asdict(plan), **run(plan)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    failed = [name for name, r in results.items() if isinstance(r, dict) and "error" in r]
    print(f"gpu_check: {len(failed)} section(s) failed {failed}" if failed else "gpu_check: every section ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
