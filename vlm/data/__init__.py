"""Data for captioning adapters: webdataset shards and their sources (folder, COCO, Karpathy, NoCaps,
img2dataset), the reader, the synthetic world, the feature cache."""

from .coco import CaptionRecord, read_coco_captions, read_karpathy
from .config import DataConfig
from .decode import BadSample, build_transform, decode_image
from .features import check_feature_cache, feature_recipe, precompute_features
from .reader import CaptionBatch, CaptionDataset, CaptionLoader
from .shards import EmptyShardSet, ShardSummary, resolve_shards, write_samples
from .sources import shards_from_annotations, shards_from_folder, shards_from_img2dataset, shards_from_records
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
    "EmptyShardSet",
    "resolve_shards",
    "write_samples",
    "CaptionRecord",
    "read_coco_captions",
    "read_karpathy",
    "shards_from_records",
    "shards_from_folder",
    "shards_from_annotations",
    "shards_from_img2dataset",
    "precompute_features",
    "feature_recipe",
    "check_feature_cache",
    "Scene",
    "SceneObject",
    "caption_vocabulary",
    "generate_scene",
    "parse_caption",
    "write_synthetic_shards",
]
