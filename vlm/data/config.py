"""Typed configs for the data side: the webdataset reader (`DataConfig`) and the synthetic world
(`SyntheticConfig`). YAML files mirror these 1:1 (see `resampler.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DataConfig", "SyntheticConfig"]


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
    max_image_pixels: int = 8192 * 8192  # larger images are skipped as decompression bombs

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "max_caption_tokens", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("num_workers", "sample_shuffle"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SyntheticConfig:
    """The synthetic captioning world: 1-3 coloured shapes on a plain background, several captions each.

    ``holdout`` lists ``colour/shape`` pairs that never appear in the training split; the
    ``compositional`` split has at least one of them in every image.
    """

    image_size: int = 64
    seed: int = 0
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    sizes: tuple[str, ...] = ("small", "large")
    size_fractions: tuple[float, ...] = (0.18, 0.28)  # object extent as a fraction of the image side
    object_count_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)  # P(1 object), P(2), P(3)
    holdout: tuple[str, ...] = ("red/triangle", "green/cross", "blue/square", "yellow/circle")
    captions_per_image: int = 5
    jitter: float = 0.02  # random shift of each object, fraction of the image side
    noise: float = 6.0  # std of the background pixel noise (0-255 scale)
    split_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 6000, "val": 200, "test": 400, "compositional": 200}
    )
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.size_fractions):
            raise ValueError(
                f"SyntheticConfig.size_fractions needs one entry per size {list(self.sizes)}, "
                f"got {list(self.size_fractions)}"
            )
        if any(w < 0 for w in self.object_count_weights) or sum(self.object_count_weights) <= 0:
            raise ValueError(f"SyntheticConfig.object_count_weights must be >= 0, got {self.object_count_weights}")
        from .synthetic import COLOUR_RGB, SHAPES  # late import: synthetic imports this module

        unknown_shapes = set(self.shapes) - set(SHAPES)
        unknown_colours = set(self.colours) - set(COLOUR_RGB)
        if unknown_shapes or unknown_colours or len(set(self.shapes)) < len(self.shapes):
            raise ValueError(
                f"SyntheticConfig.shapes must be distinct names from {list(SHAPES)} and colours from "
                f"{list(COLOUR_RGB)}; unknown: {sorted(unknown_shapes | unknown_colours)}"
            )
        for pair in self.holdout:
            colour, _, shape = pair.partition("/")
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(
                    f"SyntheticConfig.holdout entry {pair!r} must be 'colour/shape' with colour in "
                    f"{list(self.colours)} and shape in {list(self.shapes)}"
                )
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        if self.captions_per_image < 1 or self.samples_per_shard < 1:
            raise ValueError("SyntheticConfig.captions_per_image and samples_per_shard must be >= 1")
        unknown = set(self.split_sizes) - {"train", "val", "test", "compositional"}
        if unknown:
            raise ValueError(
                f"SyntheticConfig.split_sizes keys must be train/val/test/compositional, got {sorted(unknown)}"
            )

    @property
    def holdout_pairs(self) -> set[tuple[str, str]]:
        return {tuple(p.split("/", 1)) for p in self.holdout}  # type: ignore[misc]
