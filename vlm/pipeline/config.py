"""``RunConfig``: everything one captioning run needs, as nested typed dataclasses mirrored by YAML.

Every command (``pvlm-train``, ``pvlm-eval``, ``pvlm-caption``, ``pvlm-make-shards``,
``pvlm-precompute-features``, ``pvlm-demo``) reads a ``RunConfig`` YAML plus ``section.field=value``
overrides (``resampler.config.parse_cli``); each command reads the sections its ``--help`` lists.
Each part's section is defined beside the part; the three that belong to no part are defined here.

    model:      VLMConfig        vlm.config              the vision tower, resampler, projector, LM, LoRA, injection
    data:       DataConfig       vlm.data.config         shard specs, batch size, workers, shuffling, cached features
    train:      TrainConfig      vlm.training.config     optimisation, precision, checkpoints, logging
    standin:    StandInConfig    vlm.backbones           the embedded default's self-trained backbones (off by default)
    synthetic:  SyntheticConfig  vlm.data.synthetic      the synthetic world (written when ``make_synthetic`` is true)
    eval:       EvalConfig       here                    which splits, generation settings, the no-image ablation
    shards:     ShardsConfig     here                    ``pvlm-make-shards`` input and output
    features:   FeaturesConfig   here                    ``pvlm-precompute-features`` output
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from ..backbones import StandInConfig
from ..config import VLMConfig
from ..data.config import DataConfig
from ..data.synthetic import SyntheticConfig
from ..training.config import TrainConfig

__all__ = ["EvalConfig", "ShardsConfig", "FeaturesConfig", "RunConfig", "default_config_file"]


@dataclass
class EvalConfig:
    """Captioning evaluation: metrics on each split, sample captions, and the no-image ablation."""

    splits: tuple[str, ...] = ("test",)  # names of data shard specs: val, test, or compositional (synthetic)
    max_samples: int | None = None  # per split; None = all
    batch_size: int = 64
    max_new_tokens: int = 48
    num_beams: int = 1
    ablation: bool = True  # also caption each image with the image input removed (the prompt alone)
    print_samples: int = 4
    grid_samples: int = 16  # images in the PNG grid of generated vs reference captions (0: none)
    metrics_tokenizer: Literal["auto", "ptb", "simple"] = "auto"  # auto: PTB (Java) when present

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("eval.splits must name at least one split (val, test, compositional)")
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"eval.max_samples must be positive or null, got {self.max_samples}")


@dataclass
class ShardsConfig:
    """``pvlm-make-shards``: the synthetic world, a folder of images + captions file, or img2dataset output."""

    source: Literal["synthetic", "folder", "img2dataset"] = "synthetic"
    input_dir: str = ""  # folder / img2dataset output (not used for synthetic)
    captions_file: str = ""  # folder: CSV or JSONL with file name + caption(s)
    output_dir: str = ""  # default: <output_dir>/data
    prefix: str = "train"  # shard name prefix (folder / img2dataset)
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if self.samples_per_shard <= 0:
            raise ValueError(f"shards.samples_per_shard must be positive, got {self.samples_per_shard}")


@dataclass
class FeaturesConfig:
    """``pvlm-precompute-features``: run the frozen tower once, write fp16 patch features as new shards."""

    output_dir: str = ""  # default: <output_dir>/features
    splits: tuple[str, ...] = ("train", "val", "test")
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"features.batch_size must be positive, got {self.batch_size}")


@dataclass
class RunConfig:
    """One captioning run; see the module docstring for the sections."""

    model: VLMConfig = field(default_factory=VLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    standin: StandInConfig = field(default_factory=StandInConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    make_synthetic: bool = False  # write the synthetic world to <output_dir>/data first (if not there yet)
    output_dir: str = "runs/default"
    seed: int = 0
    # torch CPU threads for this run; 0 keeps torch's default. Tiny models gain nothing from more threads,
    # and threads contending for shared cores slow every step down.
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be a directory path")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def data_dir(self) -> Path:
        return Path(self.shards.output_dir) if self.shards.output_dir else self.out / "data"

    @property
    def features_dir(self) -> Path:
        return Path(self.features.output_dir) if self.features.output_dir else self.out / "features"

    @property
    def standin_dir(self) -> Path:
        return Path(self.standin.dir) if self.standin.dir else self.out / "backbones"


@contextmanager
def default_config_file() -> Iterator[Path]:
    """The embedded default's YAML (``pvlm-demo``'s default ``--config``), shipped inside the package as
    ``vlm/configs/default.yaml``: found through importlib.resources, wherever vlm is installed."""
    with resources.as_file(resources.files("vlm") / "configs" / "default.yaml") as path:
        yield path
