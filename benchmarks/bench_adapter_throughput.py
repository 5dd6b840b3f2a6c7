"""Adapter training throughput: samples/s from cached tower features vs from image shards, and when caching pays.

    .venv/bin/python benchmarks/bench_adapter_throughput.py            # headline + sweep, ~3 min on 2 idle cores
    .venv/bin/python benchmarks/bench_adapter_throughput.py --no-sweep # headline only, ~1 min
    .venv/bin/python benchmarks/bench_adapter_throughput.py --smoke    # tiny tower and LMs, seconds
    .venv/bin/python benchmarks/bench_adapter_throughput.py --profile  # + torch.profiler top ops of a cached step
    .venv/bin/python benchmarks/bench_adapter_throughput.py --json docs/bench_adapter_throughput.json

The captioning adapter (prefix mode: resampler + MLP projector + LoRA r=4; tower and LM frozen) is
trained for whole steps (data, forward, backward, AdamW) the ways a real run does, interleaved in one
process so load changes hit every path:

  images from shards    the library's reader (`vlm.data.CaptionLoader`) decodes 256 px JPEGs (what
                        img2dataset writes by default), applies the tower's open_clip preprocess and
                        tokenizes; the step runs the frozen tower on the pixels
  features from cache   the same samples encoded once by `precompute_features` (the
                        `pvlm-precompute-features` code path: fp16 ``features.npy`` shards); the reader
                        returns ``image_features`` and the step skips the tower
  compute only          the same two steps on a batch already in memory (no reading, no decoding)

The reader runs in this process (``num_workers=0``): with 2 cores, workers would only move the same CPU
time to another process. Each step's time is split by forward hooks into data (read + decode +
preprocess), vision, resampler, projector, LM forward, and the rest (backward + AdamW).

Why the ratio is what it is (Amdahl): caching removes the data decode and the tower forward and nothing
else, so cached/images <= (removed + cached step) / cached step, and even with a free LM the cached step
still pays the resampler's forward + backward ("connector-only" step below). The sweep varies the LM
(and the tower) to show where the ratio crosses 5x. Tower and LMs have random weights (offline); the
LM vocabulary is the tests' 321-token BPE, so the LM head is cheap here (a real 32k-150k vocabulary adds
its own cost to the cached step and lowers the ratio further).

Results of the last run (the table and where the ratio crosses 5x): docs/speed.md, adapter part.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter_setup import (  # noqa: E402
    FULL,
    SMOKE,
    SMOKE_SWEEP,
    SWEEP,
    Size,
    build,
    build_tower,
    endless,
    loaders,
    write_jpeg_shards,
)
from common import report, spread  # noqa: E402

from vlm.data import DataConfig, precompute_features  # noqa: E402
from vlm.data.reader import CaptionLoader  # noqa: E402
from vlm.model import VisionLanguageModel  # noqa: E402
from vlm.training.optim import adamw  # noqa: E402

STAGES = ("data", "vision", "resampler", "projector", "lm forward", "backward+optimizer")
PATHS = ("images from shards", "features from cache", "images in memory", "features in memory")


# ----------------------------------------------------------------------------------------- timing


class StageTimer:
    """Wall time of named submodules' forwards (pre/post hooks), summed over one step; removable."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.totals = dict.fromkeys(modules, 0.0)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: self._begin(name)))
            self._handles.append(module.register_forward_hook(lambda _m, _a, _o, name=name: self._end(name)))

    def _begin(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def _end(self, name: str) -> None:
        self.totals[name] += (time.perf_counter() - self._start.pop(name)) * 1e3

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def make_step(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, timer: StageTimer):
    """One training step on the next batch of ``batches`` -> per-stage ms (and "total")."""

    def step(batches: Callable[[], dict]) -> dict[str, float]:
        timer.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = batches()
        data = (time.perf_counter() - start) * 1e3
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = (time.perf_counter() - start) * 1e3
        split = {"data": data, **timer.totals}
        split["backward+optimizer"] = total - sum(split.values())
        return {**split, "total": total, "cpu": (time.process_time() - cpu_start) * 1e3}

    return step


def connector_step(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, features: torch.Tensor):
    """The cached step without the LM: resampler + projector forward, backward, AdamW (its lower bound)."""

    def step() -> dict[str, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        media, _ = model.encode_images(image_features=features)
        media.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"total": (time.perf_counter() - start) * 1e3, "cpu": (time.process_time() - cpu_start) * 1e3}

    return step


def interleaved_steps(steps: dict[str, Callable[[], dict]], warmup: int, repeats: int) -> dict[str, list[dict]]:
    """Round-robin (A B C A B C ...) so that load changes hit every path; all samples after warmup."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[dict]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(step())
    return samples


def summarise(samples: list[dict], batch: int) -> dict:
    """Median step (wall and this process's CPU time), its spread, samples/s, and the per-stage split of
    the step with the median wall time."""
    totals = [s["total"] for s in samples]
    median = statistics.median(totals)
    split = sorted(samples, key=lambda s: s["total"])[len(samples) // 2]
    return {
        "step_ms": median,
        "spread": spread(totals),
        "samples_per_s": batch / (median / 1e3),
        "cpu_ms": statistics.median(s["cpu"] for s in samples),
        "split_ms": {k: v for k, v in split.items() if k not in ("total", "cpu")},
        "all_ms": totals,
    }


# ----------------------------------------------------------------------------------------- one configuration


def run(size: Size, repeats: int = 5, warmup: int = 1, compute_only: bool = True, tower=None, root=None) -> dict:
    """Measure one configuration; see the module docstring. ``tower`` / ``root`` share work across a sweep."""
    owned = None
    if root is None:
        owned = tempfile.TemporaryDirectory()
        root = Path(owned.name)
    try:
        return _run(size, repeats, warmup, compute_only, tower, Path(root))
    finally:
        if owned is not None:
            owned.cleanup()


def _run(size: Size, repeats: int, warmup: int, compute_only: bool, tower, root: Path) -> dict:
    model = build(size, tower)
    samples = size.batch * 2  # two batches, cycled: every step still reads and decodes its own batch
    cache_dir = root / f"features-{size.tower}"
    images = root / "images" / "train-000000.tar"
    if not images.exists():
        write_jpeg_shards(root, samples, size.image_px)
    cache_s = None
    if not (cache_dir / "train-features.json").exists():
        start = time.perf_counter()
        read = DataConfig(batch_size=size.batch, image_size=model.vision.image_size[0], sample_shuffle=0)
        precompute_features(
            str(images), cache_dir, model.vision, read, prefix="train", transform=model.vision.preprocess
        )
        cache_s = time.perf_counter() - start
    from_images, from_cache = loaders(model, str(images), str(cache_dir / "train-*.tar"), size.batch)
    loss_check = check_same_training(model, from_images, from_cache)

    timer = StageTimer(
        {
            "vision": model.vision,
            "resampler": model.resampler,
            "projector": model.projector,
            "lm forward": model.language_model,
        }
    )
    optimizer = adamw(model.param_groups(1e-5))  # the trainer's AdamW (fused where it can be)
    step = make_step(model, optimizer, timer)
    image_batches, cached_batches = endless(from_images), endless(from_cache)
    in_memory = next(iter(from_images))
    features = {
        **{k: v for k, v in in_memory.items() if k != "images"},
        "image_features": model.vision(in_memory["images"]),
    }
    steps = {
        "images from shards": lambda: step(lambda: next(image_batches)),
        "features from cache": lambda: step(lambda: next(cached_batches)),
    }
    if compute_only:
        steps["images in memory"] = lambda: step(lambda: in_memory)
        steps["features in memory"] = lambda: step(lambda: features)
    steps["connector only"] = connector_step(model, optimizer, features["image_features"])
    measured = interleaved_steps(steps, warmup=warmup, repeats=repeats)
    timer.remove()

    paths = {name: summarise(s, size.batch) for name, s in measured.items()}
    images_path, cached_path = paths["images from shards"], paths["features from cache"]
    removed = images_path["split_ms"]["data"] + images_path["split_ms"]["vision"]
    cached_ms, connector_ms = cached_path["step_ms"], paths["connector only"]["step_ms"]
    result = {
        "size": asdict(size),
        "label": size.label,
        "patches": list(features["image_features"].shape[1:]),
        "text_tokens": int(in_memory["input_ids"].shape[1]),
        "threads": torch.get_num_threads(),
        "paths": paths,
        "cached_speedup": cached_path["samples_per_s"] / images_path["samples_per_s"],
        "cached_speedup_cpu_time": images_path["cpu_ms"] / cached_path["cpu_ms"],
        "removed_by_cache_ms": removed,
        "amdahl_bound": (removed + cached_ms) / cached_ms,
        "free_lm_bound": (removed + connector_ms) / connector_ms,
        "lm_budget_for_5x_ms": removed / 4,
        "caching_once_s": cache_s,
        "loss_check": loss_check,
    }
    if compute_only:
        result["compute_only_speedup"] = (
            paths["features in memory"]["samples_per_s"] / paths["images in memory"]["samples_per_s"]
        )
    return result


@torch.no_grad()
def check_same_training(model: VisionLanguageModel, from_images: CaptionLoader, from_cache: CaptionLoader) -> dict:
    """Both paths must train on the same samples and give the same loss (up to the cache's fp16 rounding)."""
    a, b = next(iter(from_images)), next(iter(from_cache))
    if a.sample_keys != b.sample_keys or not torch.equal(a["input_ids"], b["input_ids"]):
        raise ValueError(f"the two readers disagree: {a.sample_keys[:3]}... vs {b.sample_keys[:3]}...")
    encoded = model.vision(a["images"])  # (B, P, D) what the cache should hold, up to fp16 rounding
    feature_error = float((b["image_features"] - encoded).abs().max() / encoded.abs().max())
    loss_images, loss_cached = model(**a).loss.item(), model(**b).loss.item()
    return {
        "loss_images": loss_images,
        "loss_cached": loss_cached,
        "abs_diff": abs(loss_images - loss_cached),
        "feature_max_rel_error": feature_error,
    }


# ----------------------------------------------------------------------------------------- sweep


def sweep(sizes: tuple[Size, ...], repeats: int = 3, warmup: int = 1, known: dict | None = None) -> list[dict]:
    """One row per size (towers built and features cached once per tower); ``known`` reuses a measured row."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        towers: dict[str, tuple] = {}
        for size in sizes:
            if known is not None and known["size"] == asdict(size):
                rows.append({k: v for k, v in known.items() if k != "sweep"})  # a copy: no cycle in the JSON
                continue
            if size.tower not in towers:
                towers = {size.tower: build_tower(size.tower)}  # one tower in memory at a time
            start = time.perf_counter()
            row = run(size, repeats=repeats, warmup=warmup, compute_only=False, tower=towers[size.tower], root=tmp)
            row["wall_s"] = time.perf_counter() - start
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def profile_cached_step(size: Size, rows: int = 15) -> str:
    """torch.profiler's top ops (self CPU time) of one training step from cached features, in memory."""
    from torch.profiler import ProfilerActivity, profile

    model = build(size)
    batch = model.processor(["<image>Caption:"] * size.batch, captions=["a large red circle on the left"] * size.batch)
    features = torch.randn(size.batch, model.vision.num_patches, model.vision.width)
    optimizer = adamw(model.param_groups(1e-5))  # the trainer's AdamW (fused where it can be)

    def step() -> None:
        model(**batch, image_features=features).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)


# ----------------------------------------------------------------------------------------- output


def format_row(row: dict) -> str:
    p = row["paths"]
    return (
        f"  {row['label']:28s} {p['images from shards']['samples_per_s']:8.2f} {p['features from cache']['samples_per_s']:8.2f}"
        f" {row['cached_speedup']:7.2f}x {row['cached_speedup_cpu_time']:7.2f}x {row['amdahl_bound']:7.2f}x"
        f" {row['free_lm_bound']:8.2f}x"
        f" {row['removed_by_cache_ms']:9.0f} {p['features from cache']['step_ms']:9.0f} {row['lm_budget_for_5x_ms']:9.0f}"
    )


SWEEP_HEADER = (
    f"  {'configuration':28s} {'images/s':>8s} {'cached/s':>8s} {'ratio':>8s} {'CPU':>8s} {'Amdahl':>8s}"
    f" {'free LM':>9s}"
    f" {'removed':>9s} {'cached':>9s} {'5x needs':>9s}\n"
    f"  {'':28s} {'samples':>8s} {'samples':>8s} {'wall':>8s} {'ratio':>8s} {'bound':>8s} {'bound':>9s}"
    f" {'ms/step':>9s} {'ms/step':>9s} {'<= ms':>9s}"
)


def format_table(result: dict) -> str:
    s = result["size"]
    lines = [
        f"Adapter training throughput: tower {s['tower']} ({result['patches'][0]} x {result['patches'][1]} patches, "
        f"{s['image_px']} px JPEG shards), resampler {s['depth']} x {s['latents']} latents, "
        f"LM {s['lm_layers']} x {s['lm_hidden']}, batch {s['batch']} x {result['text_tokens']} tokens, "
        f"{result['threads']} threads",
    ]
    for name, path in result["paths"].items():
        lines.append(
            f"  {name:20s} {path['samples_per_s']:8.2f} samples/s  ({path['step_ms']:7.0f} ms/step, "
            f"spread {path['spread']:.0%}; CPU time {path['cpu_ms']:7.0f} ms/step)"
        )
    lines.append(
        f"  cached / images (real data path): {result['cached_speedup']:.2f}x (CPU time "
        f"{result['cached_speedup_cpu_time']:.2f}x)   compute only: "
        f"{result.get('compute_only_speedup', float('nan')):.2f}x   Amdahl bound {result['amdahl_bound']:.2f}x, "
        f"with a free LM {result['free_lm_bound']:.2f}x"
    )
    for name in ("images from shards", "features from cache"):
        split = result["paths"][name]["split_ms"]
        total = sum(split.values())
        parts = ", ".join(f"{k} {v:.0f} ({v / total:.0%})" for k, v in split.items())
        lines.append(f"  step {name} (ms): {parts}")
    check = result["loss_check"]
    lines.append(
        f"  same batch, same loss: images {check['loss_images']:.5f}, cached {check['loss_cached']:.5f} "
        f"(|diff| {check['abs_diff']:.1e}; fp16 cache vs tower features: max rel. error "
        f"{check['feature_max_rel_error']:.1e})"
    )
    if result.get("caching_once_s") is not None:
        lines.append(f"  caching once (precompute_features): {result['caching_once_s']:.1f} s")
    if result.get("sweep"):
        lines += ["", "When caching pays (removed = data + vision per step; 5x needs cached step <= removed / 4):"]
        lines += [SWEEP_HEADER] + [format_row(row) for row in result["sweep"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny tower and LMs: checks that it all runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="the headline configuration only")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of a cached step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_all(args.smoke, args.repeats, sweep_too=not args.no_sweep, profile=args.profile, json_path=args.json)


def run_all(smoke: bool, repeats: int = 5, sweep_too: bool = True, profile: bool = False, json_path=None) -> dict:
    headline = SMOKE if smoke else FULL
    result = run(headline, repeats=repeats)
    if sweep_too:
        print(format_table(result) + "\n\nsweep:\n" + SWEEP_HEADER, flush=True)
        result["sweep"] = sweep(SMOKE_SWEEP if smoke else SWEEP, repeats=max(2, repeats // 2 + 1), known=result)
    if profile:
        result["profile"] = profile_cached_step(headline)
        print(result["profile"])
    return report(result, format_table(result), json_path)


if __name__ == "__main__":
    main()
