"""What the adapter-throughput benchmark (bench_adapter_throughput.py) measures: its configurations,
the adapter model around a random open_clip tower, the JPEG shards it reads and the two readers over
them (images, and the feature cache of the same samples in the same order). Offline: random weights,
the tests' BPE tokenizer, synthetic-world images.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.config import ResamplerConfig, VisionConfig  # noqa: E402
from vlm.data import DataConfig, SyntheticConfig, generate_scene, write_samples  # noqa: E402
from vlm.data.reader import CaptionLoader  # noqa: E402
from vlm.model import VisionLanguageModel  # noqa: E402
from vlm.testing import register_tiny_clip, tiny_lm, tiny_tokenizer, tiny_vlm_config  # noqa: E402

__all__ = [
    "Size",
    "FULL",
    "SMOKE",
    "SWEEP",
    "SMOKE_SWEEP",
    "build_tower",
    "build",
    "write_jpeg_shards",
    "loaders",
    "endless",
]


@dataclass(frozen=True)
class Size:
    """One configuration: tower (open_clip name or "tiny"), LM layers x hidden, resampler, batch."""

    tower: str = "ViT-B-32"
    lm_layers: int = 4
    lm_hidden: int = 512
    latents: int = 64
    depth: int = 2
    batch: int = 8
    image_px: int = 256  # stored JPEG side (img2dataset's default resize)

    @property
    def label(self) -> str:
        return f"{self.tower} + LM {self.lm_layers}x{self.lm_hidden}"


FULL = Size()
SMOKE = Size(tower="tiny", lm_layers=2, lm_hidden=32, latents=8, depth=1, batch=4, image_px=48)
SWEEP = (
    Size(lm_layers=2, lm_hidden=256),
    FULL,
    Size(lm_layers=8, lm_hidden=1024),
    Size(tower="ViT-B-16", lm_layers=2, lm_hidden=256),
    Size(tower="ViT-L-14", lm_layers=2, lm_hidden=256),
)
SMOKE_SWEEP = (SMOKE, Size(tower="tiny", lm_layers=1, lm_hidden=16, latents=8, depth=1, batch=4, image_px=48))


def build_tower(name: str):
    """(open_clip model, its eval preprocess), random weights, offline."""
    import open_clip

    model_name = register_tiny_clip() if name == "tiny" else name
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    return model_name, model, preprocess


def build(size: Size, tower=None) -> VisionLanguageModel:
    """The adapter model of ``size`` around an (optionally shared) open_clip tower."""
    name, vision, preprocess = build_tower(size.tower) if tower is None else tower
    tokenizer = tiny_tokenizer()
    hidden = size.lm_hidden
    heads = max(4, hidden // 64)
    lm = tiny_lm(
        "llama",
        tokenizer,
        hidden_size=hidden,
        num_hidden_layers=size.lm_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=4 * hidden,
    )
    torch.manual_seed(1)
    config = tiny_vlm_config(
        "llama",
        vision=VisionConfig(name=name, pretrained=None),
        resampler=ResamplerConfig(depth=size.depth, num_latents=size.latents, heads=8, head_dim=64),
        caption_prompt="Caption:",
    )
    return VisionLanguageModel.from_parts(vision, lm, tokenizer, config, preprocess=preprocess).train()


def write_jpeg_shards(root: Path, samples: int, image_px: int) -> str:
    """Synthetic-world samples stored as JPEG (quality 95) + captions JSON, with the library's writer."""
    config = SyntheticConfig(image_size=image_px)

    def encoded():
        for index in range(samples):
            scene = generate_scene(config, "train", index)
            buffer = io.BytesIO()
            scene.image.save(buffer, format="JPEG", quality=95)
            yield {"__key__": scene.key, "jpg": buffer.getvalue(), "json": scene.metadata()}

    summary = write_samples(encoded(), root / "images", prefix="train", samples_per_shard=samples)
    return summary.shards[0]


def loaders(model: VisionLanguageModel, images: str, features: str, batch: int) -> tuple[CaptionLoader, ...]:
    """The training reader over the image shards and over the feature cache, same sample order."""
    config = DataConfig(
        batch_size=batch,
        image_size=model.vision.image_size[0],
        shard_shuffle=False,
        sample_shuffle=0,
        caption_choice="first",
        drop_last=True,
    )
    common = {"text": model.processor, "prompt": model.config.caption_prompt, "train": True}
    from_images = CaptionLoader(images, config, transform=model.vision.preprocess, **common)
    from_cache = CaptionLoader(features, replace(config, use_cached_features=True), **common)
    return from_images, from_cache


def endless(loader: CaptionLoader) -> Iterator[dict]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
