"""Feature cache: run the frozen vision tower once over a dataset and store its patch tokens (fp16).

``precompute_features(shards, out_dir, tower, config)`` reads image shards (bad samples skipped and
counted as usual), encodes every image, and writes new shards holding ``key.features.npy`` (P, D)
fp16 next to the sample's captions JSON (and, by default, its original image bytes, so evaluation
grids still work). ``DataConfig(use_cached_features=True)`` then makes the reader return
``image_features`` (B, P, D) fp32 instead of ``images``. ``{prefix}-features.json`` records the tower,
the preprocessing and the feature shape; `check_feature_cache` compares it with what training expects.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_write
from .config import DataConfig
from .decode import FEATURES_EXT
from .reader import CaptionLoader
from .shards import IMAGE_EXTENSIONS, ShardSummary, write_samples

__all__ = ["precompute_features", "check_feature_cache", "encode_features"]

log = logging.getLogger(__name__)


def encode_features(features: Tensor) -> bytes:
    """(P, D) tensor -> ``.npy`` bytes in fp16 (half the size of fp32; plenty for frozen features)."""
    if features.dim() != 2:
        raise ValueError(f"features must be (P, D) per sample, got shape {tuple(features.shape)}")
    buffer = io.BytesIO()
    np.save(buffer, features.detach().to(torch.float16).cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


@torch.no_grad()
def precompute_features(
    shards: str | list[str],
    out_dir: str | Path,
    tower: Callable[[Tensor], Tensor],
    config: DataConfig,
    *,
    prefix: str = "features",
    transform: Callable | None = None,
    keep_images: bool = True,
    samples_per_shard: int = 1000,
    description: dict[str, Any] | None = None,
) -> ShardSummary:
    """Encode every image of ``shards`` with ``tower`` ((B, 3, H, W) -> (B, P, D)) into feature shards.

    ``config`` supplies the image size, preprocessing, batch size and workers; ``transform`` overrides
    the preprocessing (pass the tower's own open_clip preprocess for real towers).
    ``description`` (e.g. the tower's config) is stored in the index for `check_feature_cache`.
    """
    read_config = replace(config, use_cached_features=False, resampled=False)
    loader = CaptionLoader(shards, read_config, transform=transform, train=False, keep_raw=True)
    if isinstance(tower, torch.nn.Module):
        tower.eval()
    device = next((p.device for p in getattr(tower, "parameters", lambda: [])()), torch.device("cpu"))
    shape: list[int] = []

    def samples():
        for batch in loader:
            features = tower(batch["images"].to(device))  # (B, P, D)
            if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[0] != len(batch.sample_keys):
                got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
                raise ValueError(f"the tower must map (B, 3, H, W) images to (B, P, D) features, got {got}")
            shape[:] = list(features.shape[1:])
            for key, raw, row in zip(batch.sample_keys, batch.raw, features):
                sample = {"__key__": key, FEATURES_EXT: encode_features(row)}
                sample.update({k: v for k, v in raw.items() if k in ("json", "txt")})
                if keep_images:
                    sample.update({k: v for k, v in raw.items() if k in IMAGE_EXTENSIONS})
                yield sample

    summary = write_samples(samples(), out_dir, prefix=prefix, samples_per_shard=samples_per_shard)
    summary.skipped = dict(loader.bad_samples)
    info = {
        "feature_shape": shape,
        "dtype": "float16",
        "image_size": config.image_size,
        "preprocess": config.preprocess if transform is None else "custom",
        "source": shards if isinstance(shards, str) else list(shards),
        "tower": description or {},
        "converted": dict(loader.converted),
        **asdict(summary),
    }
    atomic_write(Path(out_dir) / f"{prefix}-features.json", json.dumps(info, indent=1))
    log.info("cached %s features of %d samples into %s", shape, summary.num_samples, out_dir)
    return summary


def check_feature_cache(
    index_path: str | Path, *, feature_shape: tuple[int, int], tower: dict[str, Any] | None = None
) -> dict:
    """Load ``{prefix}-features.json`` and raise a ValueError when it was made for another tower."""
    info = json.loads(Path(index_path).read_text(encoding="utf-8"))
    if tuple(info["feature_shape"]) != tuple(feature_shape):
        raise ValueError(
            f"{index_path}: cached features are {tuple(info['feature_shape'])} per image but the model's vision "
            f"tower gives {tuple(feature_shape)}; re-run precompute_features with this tower"
        )
    if tower is not None and info.get("tower") and info["tower"] != tower:
        raise ValueError(f"{index_path}: cached features come from tower {info['tower']}, not {tower}")
    return info
