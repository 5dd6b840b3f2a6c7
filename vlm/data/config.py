"""`DataConfig`: where the caption shards are and how the reader reads them (``data:`` in a run YAML).

The synthetic world's `SyntheticConfig` lives beside the world, in `vlm.data.synthetic`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    Shard specs accept a brace pattern (``data/train-{000000..000003}.tar``), a glob
    (``data/train-*.tar``), a directory (every ``*.tar`` in it) or several of those joined by ``::``.
    """

    train_shards: str = ""
    val_shards: str = ""
    test_shards: str = ""
    batch_size: int = 32
    num_workers: int = 0
    shard_shuffle: bool = True  # a new shard order every epoch (seeded by seed and epoch)
    sample_shuffle: int = 1000  # sample shuffle buffer (0 = no sample shuffle)
    resampled: bool = False  # sample shards with replacement: an endless stream, epochs by step count
    seed: int = 0
    drop_last: bool = False
    image_size: int = 64
    preprocess: Literal["open_clip", "plain"] = "open_clip"  # open_clip.image_transform, or resize + to-tensor
    image_mean: tuple[float, float, float] | None = None  # None: open_clip's OPENAI mean
    image_std: tuple[float, float, float] | None = None
    max_caption_tokens: int = 32
    caption_choice: Literal["random", "first"] = "random"  # which reference caption a training sample uses
    use_cached_features: bool = False  # read `features.npy` (see vlm.data.features) instead of images
    # training on cached features: keep up to this many MB of read shards in memory for later epochs
    # (vlm.data.memory; same batches, no tar parsing or .npy decoding); 0 reads every epoch from disk
    features_in_memory_mb: int = 0
    max_image_pixels: int = 8192 * 8192  # larger images are skipped as decompression bombs

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "max_caption_tokens", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("num_workers", "sample_shuffle", "features_in_memory_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")
