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
    eval:       EvalConfig       here                    splits, generation, COCO results files, METEOR, ablation
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
    """Captioning evaluation in the COCO protocol: one caption per image scored against all its references.

    Writes ``eval/<split>.coco_results.json`` (``[{"image_id", "caption"}]``), ``<split>.coco_annotations.json``
    (its references in COCO's layout: ``COCOEvalCap`` scores the pair directly), ``<split>.json`` and
    ``metrics.json``. With ``results_file`` set, ``pvlm-eval`` scores that file instead of a model.
    """

    splits: tuple[str, ...] = ("test",)  # names of data shard specs: val, test, or compositional (synthetic)
    max_samples: int | None = None  # per split; None = all
    batch_size: int = 64  # images per generate call (pvlm-caption's default --batch-size too)
    max_new_tokens: int = 48
    num_beams: int = 1
    ablation: bool = True  # also caption each image with the image input removed (the prompt alone)
    print_samples: int = 4
    grid_samples: int = 16  # images in the PNG grid of generated vs reference captions (0: none)
    metrics_tokenizer: Literal["auto", "ptb", "simple"] = "auto"  # auto: PTB (Java) when present
    meteor: bool | None = None  # METEOR (Java, slow); None: when Java is present
    progress: bool = True  # tqdm bars (stderr) over generation and metrics
    # score this COCO results file ([{"image_id", "caption"}], e.g. a published one) instead of a model
    results_file: str = ""
    annotations_file: str = ""  # its references: a COCO-layout captions file (captions_val2014.json, NoCaps val)

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("eval.splits must name at least one split (val, test, compositional)")
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"eval.max_samples must be positive or null, got {self.max_samples}")
        if bool(self.results_file) != bool(self.annotations_file):
            raise ValueError("eval.results_file and eval.annotations_file go together: set both or neither")


@dataclass
class ShardsConfig:
    """``pvlm-make-shards``: shards from the synthetic world, a folder of images + captions file, a COCO /
    Karpathy / NoCaps annotation file + its images, or img2dataset output (one sample per image, all
    its captions). A new set replaces the old one of the same prefix only once complete."""

    source: Literal["synthetic", "folder", "coco", "karpathy", "nocaps", "img2dataset"] = "synthetic"
    # the images: folder / coco / nocaps: the image folder; karpathy: the folder holding the split file's
    # filepaths (COCO: train2014/ and val2014/; Flickr30k: the images); img2dataset: its output folder
    input_dir: str = ""
    captions_file: str = ""  # folder: CSV or JSONL with file name + caption(s)
    annotations_file: str = ""  # coco: captions_*.json; karpathy: dataset_coco.json etc.; nocaps: its val/test json
    split: str = ""  # karpathy: train, restval, val or test (several joined by +, e.g. train+restval)
    output_dir: str = ""  # default: <output_dir>/data
    prefix: str = ""  # shard name prefix; default: the karpathy split (+ becomes _), else "train"
    samples_per_shard: int = 1000
    progress: bool = True  # tqdm bar (stderr) over the images

    def __post_init__(self) -> None:
        if self.samples_per_shard <= 0:
            raise ValueError(f"shards.samples_per_shard must be positive, got {self.samples_per_shard}")
        if "/" in self.prefix:
            raise ValueError(f"shards.prefix must be a plain name, got {self.prefix!r}")

    @property
    def shard_prefix(self) -> str:
        if self.prefix:
            return self.prefix
        return self.split.replace("+", "_") if self.source == "karpathy" and self.split else "train"


@dataclass
class FeaturesConfig:
    """``pvlm-precompute-features``: run the frozen tower once, write fp16 patch features as new shards.

    A cache records its source shards, the ``model.vision`` section and the preprocessing; when any of
    them changed it is rebuilt (``on_change: rebuild``) or the run stops naming the difference."""

    output_dir: str = ""  # default: <output_dir>/features
    splits: tuple[str, ...] = ("train", "val", "test")
    batch_size: int = 256
    on_change: Literal["rebuild", "error"] = "rebuild"  # when the cache was built from other shards/tower/preprocess

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
    # torch CPU threads for this run; 0 = auto: the cores idle when the command starts (vlm.threads),
    # since a thread on a core another job uses slows every step of a small model down several times.
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be a directory path")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = auto: the idle cores), got {self.threads}")

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
