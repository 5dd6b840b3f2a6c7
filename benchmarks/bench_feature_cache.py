"""Feature cache: training-input throughput from cached patch features vs on-the-fly encoding.

    .venv/bin/python benchmarks/bench_feature_cache.py                 # ~1-2 min on 2 quiet CPU cores
    .venv/bin/python benchmarks/bench_feature_cache.py --towers tiny --samples 512

For each frozen tower (random weights, built offline) the same synthetic-world shards are read two
ways, interleaved in one run: (a) decode + open_clip preprocess + tower forward per batch (what
training does without a cache) and (b) read the fp16 feature shards `precompute_features` wrote.
Prints samples/s of each, the ratio (goal >= 5x), the one-off caching time, and the shard sizes.
Towers: ``tiny`` = the tests' tiny ViT (32 px, 16 patches x 48), ``vit-b-32`` = open_clip ViT-B-32
(224 px, 49 patches x 768), the realistic default.

Results of the last run: docs/speed.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_ms, spread  # noqa: E402

from vlm.config import VisionConfig  # noqa: E402
from vlm.data import DataConfig, SyntheticConfig, write_synthetic_shards  # noqa: E402
from vlm.data.features import precompute_features  # noqa: E402
from vlm.data.reader import CaptionLoader  # noqa: E402
from vlm.vision import VisionTower  # noqa: E402


def build_tower(name: str) -> VisionTower:
    import open_clip

    from vlm.testing import register_tiny_clip

    model_name = register_tiny_clip() if name == "tiny" else "ViT-B-32"
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    return VisionTower(model, VisionConfig(name=model_name, pretrained=None), preprocess)


def run(tower_name: str, samples: int, batch_size: int, workers: int, repeats: int, root: Path) -> float:
    tower = build_tower(tower_name)
    size = tower.image_size[0]
    shards = write_synthetic_shards(SyntheticConfig(samples_per_shard=256), root / "images", {"train": samples})
    config = DataConfig(batch_size=batch_size, num_workers=workers, image_size=size, sample_shuffle=0)
    start = time.perf_counter()
    cache = precompute_features(shards["train"].pattern, root / f"features-{tower_name}", tower, config)
    cache_s = time.perf_counter() - start
    on_the_fly_loader = CaptionLoader(shards["train"].pattern, config, transform=tower.preprocess, train=False)
    cached_config = DataConfig(**{**config.__dict__, "use_cached_features": True})
    cached_loader = CaptionLoader(cache.pattern, cached_config, train=False)

    def on_the_fly() -> None:
        for batch in on_the_fly_loader:
            tower(batch["images"])  # (B, P, D): what the resampler would consume

    def cached() -> None:
        for batch in cached_loader:
            batch["image_features"].sum()  # (B, P, D) already

    times = interleaved_ms({"on the fly": on_the_fly, "cached": cached}, warmup=1, repeats=repeats)
    rates = {name: samples / (ms / 1e3) for name, (ms, _) in times.items()}
    image_mb = sum(Path(p).stat().st_size for p in shards["train"].shards) / 2**20
    cache_mb = sum(Path(p).stat().st_size for p in cache.shards) / 2**20
    ratio = rates["cached"] / rates["on the fly"]
    print(
        f"{tower_name:9s} P x D = {tower.num_patches} x {tower.width}, {samples} samples, batch {batch_size}, "
        f"{workers} workers"
    )
    for name, (ms, all_ms) in times.items():
        print(f"  {name:11s} {rates[name]:9.1f} samples/s  (median {ms:8.1f} ms per pass, spread {spread(all_ms):.0%})")
    print(f"  ratio       {ratio:9.1f}x  (goal >= 5x)")
    print(f"  caching once: {cache_s:.1f} s; shards: images {image_mb:.1f} MiB, features {cache_mb:.1f} MiB")
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", nargs="+", default=["tiny", "vit-b-32"], choices=["tiny", "vit-b-32"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.towers:
            run(name, args.samples, args.batch_size, args.workers, args.repeats, Path(tmp) / name)


if __name__ == "__main__":
    main()
