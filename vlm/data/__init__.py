"""Data for captioning adapters: webdataset shards, the reader, the synthetic world, the feature cache."""

from .config import DataConfig
from .decode import BadSample, build_transform, decode_image
from .features import check_feature_cache, precompute_features
from .reader import CaptionBatch, CaptionDataset, CaptionLoader
from .shards import ShardSummary, resolve_shards, shards_from_folder, shards_from_img2dataset, write_samples
from .synthetic import (
    Scene,
    SceneObject,
    SyntheticConfig,
    caption_vocabulary,
    generate_scene,
    parse_caption,
    write_synthetic_shards,
)

__all__ = [
    "DataConfig",
    "SyntheticConfig",
    "CaptionLoader",
    "CaptionDataset",
    "CaptionBatch",
    "BadSample",
    "build_transform",
    "decode_image",
    "ShardSummary",
    "resolve_shards",
    "shards_from_folder",
    "shards_from_img2dataset",
    "write_samples",
    "precompute_features",
    "check_feature_cache",
    "Scene",
    "SceneObject",
    "caption_vocabulary",
    "generate_scene",
    "parse_caption",
    "write_synthetic_shards",
]
