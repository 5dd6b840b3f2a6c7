"""perceiver-vlm's vision-language models: frozen open_clip tower -> resampler -> any HF causal LM."""

from . import quiet  # noqa: F401  (first: silences known-harmless third-party messages, narrowly)
from .checkpoint import load_component, read_manifest
from .config import (
    InjectionConfig,
    LMConfig,
    LoRAConfig,
    ProjectorConfig,
    ResamplerConfig,
    VisionConfig,
    VLMConfig,
)
from .model import VisionLanguageModel
from .pipeline import EvalConfig, RunConfig
from .processor import IGNORE_INDEX, VLMProcessor
from .registry import LM_FAMILIES, LMFamily
from .training import EpochLoader, TrainConfig, train
from .vision import VisionTower

__all__ = [
    "VisionLanguageModel",
    "VLMProcessor",
    "VisionTower",
    "IGNORE_INDEX",
    "VLMConfig",
    "VisionConfig",
    "ResamplerConfig",
    "ProjectorConfig",
    "LMConfig",
    "LoRAConfig",
    "InjectionConfig",
    "LM_FAMILIES",
    "LMFamily",
    "load_component",
    "read_manifest",
    "RunConfig",
    "EvalConfig",
    "TrainConfig",
    "EpochLoader",
    "train",
]
