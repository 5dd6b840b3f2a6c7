"""Adapter training throughput: samples/s from cached tower features vs images through the frozen tower.

    .venv/bin/python benchmarks/bench_adapter_throughput.py          # ViT-B/32 tower, ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_adapter_throughput.py --smoke  # tiny tower and LM, seconds
    .venv/bin/python benchmarks/bench_adapter_throughput.py --json docs/bench_adapter_throughput.json

The captioning adapter (prefix mode: resampler + projector + LoRA on the LM; tower and LM frozen) is
trained for whole steps (forward, backward, AdamW) two ways, interleaved in one process:
(a) from images: every step runs the frozen open_clip tower on the batch's pixels;
(b) from cached features: the tower's patch tokens, computed once, are fed as ``image_features``.
Decoding and preprocessing are left out (benchmarks/bench_feature_cache.py measures the loaders), so
the ratio here is the compute side only. The tower is open_clip ViT-B-32 (random weights; 49 patches
x 768 at 224 px), the resampler 2 layers x 64 latents, the LM a llama-shaped 4-layer x 512 model.

Where the time goes in a step from images: forward hooks time the tower, the resampler (+ projector)
and the LM forwards; backward and the optimizer step are the rest.

Expected on 2 shared cores: cached ~5-10x the image path (the frozen ViT-B/32 forward dominates it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_ms, report, spread  # noqa: E402

from vlm.config import ResamplerConfig, VisionConfig  # noqa: E402
from vlm.model import VisionLanguageModel  # noqa: E402
from vlm.testing import register_tiny_clip, tiny_lm, tiny_tokenizer, tiny_vlm_config  # noqa: E402

FULL = {"tower": "ViT-B-32", "lm_hidden": 512, "lm_layers": 4, "latents": 64, "depth": 2, "batch": 8}
SMOKE = {"tower": "tiny", "lm_hidden": 32, "lm_layers": 2, "latents": 8, "depth": 1, "batch": 4}


def build(size: dict) -> VisionLanguageModel:
    import open_clip

    name = register_tiny_clip() if size["tower"] == "tiny" else size["tower"]
    torch.manual_seed(0)
    vision, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer = tiny_tokenizer()
    hidden = size["lm_hidden"]
    lm = tiny_lm(
        "llama",
        tokenizer,
        hidden_size=hidden,
        num_hidden_layers=size["lm_layers"],
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(4, hidden // 64),
        intermediate_size=4 * hidden,
    )
    config = tiny_vlm_config(
        "llama",
        vision=VisionConfig(name=name, pretrained=None),
        resampler=ResamplerConfig(depth=size["depth"], num_latents=size["latents"], heads=8, head_dim=64),
    )
    model = VisionLanguageModel.from_parts(vision, lm, tokenizer, config, preprocess=preprocess)
    return model.train()


class StageTimer:
    """Wall time of each named submodule's forward, via pre/post hooks (summed over a step)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.totals = {name: 0.0 for name in modules}
        self._start: dict[str, float] = {}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda _m, _a, name=name: self._begin(name))
            module.register_forward_hook(lambda _m, _a, _o, name=name: self._end(name))

    def _begin(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        self.totals[name] += (time.perf_counter() - self._start.pop(name)) * 1e3

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def run(size: dict, repeats: int = 5, warmup: int = 1) -> dict:
    model = build(size)
    batch_size = size["batch"]
    image_size = model.vision.image_size[0]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    text = model.processor(
        ["<image>Caption:"] * batch_size, captions=["a red circle left of a blue square"] * batch_size
    )
    with torch.no_grad():
        features = model.vision(pixels)  # (B, P, D): what the cache stores
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step(**media) -> None:
        out = model(text["input_ids"], text["attention_mask"], text["labels"], **media)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved_ms(
        {"from images": lambda: step(images=pixels), "from cached features": lambda: step(image_features=features)},
        warmup=warmup,
        repeats=repeats,
    )
    rates = {name: batch_size / (ms / 1e3) for name, (ms, _) in times.items()}

    timer = StageTimer({"vision": model.vision, "resampler+projector": model.resampler, "lm": model.language_model})
    split_samples: list[dict[str, float]] = []
    for _ in range(max(3, repeats // 2)):
        timer.reset()
        start = time.perf_counter()
        step(images=pixels)
        total = (time.perf_counter() - start) * 1e3
        split = dict(timer.totals)
        split["backward+optimizer"] = total - sum(split.values())
        split["total"] = total
        split_samples.append(split)
    # the step with the median total, so that the parts add up (the projector is inside "backward+optimizer")
    split = sorted(split_samples, key=lambda s: s["total"])[len(split_samples) // 2]
    return {
        "size": size,
        "patches": list(features.shape[1:]),
        "threads": torch.get_num_threads(),
        "step_ms": {name: ms for name, (ms, _) in times.items()},
        "step_spread": {name: spread(s) for name, (_, s) in times.items()},
        "samples_per_s": rates,
        "cached_speedup": rates["from cached features"] / rates["from images"],
        "split_ms_from_images": split,
    }


def format_table(result: dict) -> str:
    s = result["size"]
    lines = [
        f"Adapter training throughput: tower {s['tower']} ({result['patches'][0]} x {result['patches'][1]} patches), "
        f"resampler {s['depth']} x {s['latents']} latents, LM {s['lm_layers']} x {s['lm_hidden']}, batch {s['batch']}",
    ]
    for name, rate in result["samples_per_s"].items():
        lines.append(
            f"  {name:22s} {rate:8.2f} samples/s  ({result['step_ms'][name]:8.0f} ms/step, "
            f"spread {result['step_spread'][name]:.0%})"
        )
    lines.append(f"  cached / images: {result['cached_speedup']:.1f}x")
    split = result["split_ms_from_images"]
    parts = ", ".join(f"{k} {v:.0f} ms ({v / split['total']:.0%})" for k, v in split.items() if k != "total")
    lines.append(f"  step from images: {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(SMOKE if args.smoke else FULL, repeats=args.repeats)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
