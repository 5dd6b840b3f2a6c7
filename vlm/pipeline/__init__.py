"""The captioning pipeline the ``pvlm-*`` commands run, one step per function, all driven by a `RunConfig`.

config.py    RunConfig: every section of a run; EvalConfig, ShardsConfig, FeaturesConfig
assets.py    what a run makes before training: shards, synthetic world, stand-ins, feature cache
steps.py     build the VLM, train it, load a trained adapter; the train / eval / caption / demo commands
evaluate.py  caption and score every split in the COCO protocol (or score a COCO results file), report
"""

from .assets import ensure_feature_cache, ensure_standins, make_shards, make_synthetic_world, prepare, split_spec
from .config import EvalConfig, FeaturesConfig, RunConfig, ShardsConfig
from .evaluate import format_split_report, run_evaluation, score_results
from .steps import (
    build_model,
    cache_features,
    caption_files,
    demo,
    evaluate_adapter,
    find_images,
    load_trained,
    run_training,
    train_adapter,
    train_loader,
)

__all__ = [
    "RunConfig",
    "EvalConfig",
    "ShardsConfig",
    "FeaturesConfig",
    "prepare",
    "make_shards",
    "make_synthetic_world",
    "ensure_standins",
    "ensure_feature_cache",
    "split_spec",
    "build_model",
    "train_loader",
    "run_training",
    "load_trained",
    "run_evaluation",
    "score_results",
    "format_split_report",
    "cache_features",
    "train_adapter",
    "evaluate_adapter",
    "find_images",
    "caption_files",
    "demo",
]
