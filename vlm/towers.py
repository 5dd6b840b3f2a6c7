"""The tower ``config.vision.kind`` names: open_clip (`vlm.vision`) or transformers (`vlm.hf_vision`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .config import VisionConfig
from .hf_vision import HFVisionTower, load_hf_vision
from .local import check_vision_paths
from .vision import FrozenTower, VisionTower, load_open_clip

__all__ = ["load_vision", "build_vision_tower", "load_vision_tower"]


def load_vision(config: VisionConfig):
    """(tower model, PIL preprocess) named by ``config``: open_clip or a transformers checkpoint."""
    check_vision_paths(config)
    if config.kind == "open_clip":
        return load_open_clip(config)
    return load_hf_vision(config)


def build_vision_tower(model: nn.Module, config: VisionConfig, preprocess: Callable | None = None) -> FrozenTower:
    """The frozen tower of ``config.kind`` around a model already in memory."""
    if config.kind == "open_clip":
        return VisionTower(model, config, preprocess)
    return HFVisionTower(model, config, preprocess)


def load_vision_tower(config: VisionConfig) -> FrozenTower:
    """``build_vision_tower(*load_vision(config), ...)``: the tower from its config fields alone."""
    model, preprocess = load_vision(config)
    return build_vision_tower(model, config, preprocess)
