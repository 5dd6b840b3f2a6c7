"""Data for captioning adapters: webdataset shards, the reader, the synthetic world, the feature cache."""

from .config import DataConfig, SyntheticConfig
from .shards import ShardSummary, resolve_shards, shards_from_folder, shards_from_img2dataset, write_samples
from .synthetic import Scene, SceneObject, caption_vocabulary, generate_scene, parse_caption, write_synthetic_shards

__all__ = [
    "DataConfig",
    "SyntheticConfig",
    "ShardSummary",
    "resolve_shards",
    "shards_from_folder",
    "shards_from_img2dataset",
    "write_samples",
    "Scene",
    "SceneObject",
    "caption_vocabulary",
    "generate_scene",
    "parse_caption",
    "write_synthetic_shards",
]
