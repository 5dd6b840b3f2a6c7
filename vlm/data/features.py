"""Feature cache: run the frozen vision tower once over a dataset and store its patch tokens (fp16).

``precompute_features(shards, out_dir, tower, config)`` reads image shards (bad samples skipped and
counted as usual), encodes every image, and writes new shards holding ``key.features.npy`` (P, D)
fp16 next to the sample's captions JSON (and, by default, its original image bytes, so evaluation
grids still work). ``DataConfig(use_cached_features=True)`` then makes the reader return
``image_features`` (B, P, D) fp32 instead of ``images``.

``{prefix}-features.json`` records what the cache was built from (`feature_recipe`): every source
shard with its size and modification time, the whole vision-tower config (plus the size and time of
any local weights file it names) and the preprocessing transform. `check_feature_cache` lists what
differs from the recipe a run wants; a cache is only reused when nothing does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_write
from .config import DataConfig
from .decode import FEATURES_EXT, build_transform
from .reader import CaptionLoader
from .shards import IMAGE_EXTENSIONS, ShardSummary, resolve_shards, write_samples

__all__ = ["precompute_features", "feature_recipe", "check_feature_cache", "encode_features"]

RECIPE_VERSION = 1  # bump when the meaning of cached features changes

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
    vision: Mapping[str, Any] | None = None,
) -> ShardSummary:
    """Encode every image of ``shards`` with ``tower`` ((B, 3, H, W) -> (B, P, D)) into feature shards.

    ``config`` supplies the image size, preprocessing, batch size and workers; ``transform`` overrides
    the preprocessing (pass the tower's own open_clip preprocess for real towers). ``vision`` (the
    tower's config as a dict) goes into the recorded `feature_recipe`.
    """
    index = Path(out_dir) / f"{prefix}-features.json"
    index.unlink(missing_ok=True)  # while a cache is rebuilt there is no record claiming it is complete
    recipe = feature_recipe(shards, vision or {}, transform if transform is not None else build_transform(config))
    read_config = replace(config, use_cached_features=False, resampled=False)
    # images without captions (NoCaps test) are cached too: the cache copies samples, training readers skip them
    loader = CaptionLoader(shards, read_config, transform=transform, train=False, keep_raw=True, allow_uncaptioned=True)
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
        "recipe": recipe,
        "converted": dict(loader.converted),
        **asdict(summary),
    }
    atomic_write(index, json.dumps(info, indent=1))
    log.info("cached %s features of %d samples into %s", shape, summary.num_samples, out_dir)
    return summary


def _stamp(path: str | Path) -> dict[str, Any]:
    """A file's identity for the recipe: absolute path, size and modification time (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": os.path.abspath(path), "missing": True}
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _describe_transform(transform: Any) -> str:
    """A transform's repr (torchvision's lists every step and its parameters), without memory addresses."""
    return " ".join(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform)).split())


def feature_recipe(shards: str | list[str], vision: Mapping[str, Any], transform: Any) -> dict[str, Any]:
    """What a feature cache is built from: the source shards (size, mtime), the vision config (any
    local weights file or folder it names stamped too) and the preprocessing."""
    weights = []
    for value in vision.values():
        if isinstance(value, str) and value and os.path.isfile(value):
            weights.append(_stamp(value))
        elif isinstance(value, str) and value and os.path.isdir(value):
            weights += [_stamp(p) for p in sorted(Path(value).iterdir()) if p.is_file()]
    return {
        "version": RECIPE_VERSION,
        "shards": [_stamp(url) for url in resolve_shards(shards)],
        "vision": dict(vision),
        "weights": weights,
        "preprocess": _describe_transform(transform),
    }


def _folders(paths: list[str]) -> str:
    return ", ".join(sorted({os.path.dirname(p) for p in paths}))


def _file_changes(what: str, old: list[dict], new: list[dict]) -> list[str]:
    before, after = {f["path"]: f for f in old}, {f["path"]: f for f in new}
    gone, came = [p for p in before if p not in after], [p for p in after if p not in before]
    lines = []
    if gone and sorted(map(os.path.basename, gone)) == sorted(map(os.path.basename, came)):
        # the same names in another folder (a copied or moved dataset): say where, not "6 removed, 6 added"
        count = f"{len(gone)} file name" + ("s" if len(gone) > 1 else "")
        lines.append(f"{what}: the same {count}, now in {_folders(came)} (were in {_folders(gone)})")
        gone = came = []
    removed, added = [os.path.basename(p) for p in gone], [os.path.basename(p) for p in came]
    changed = [os.path.basename(p) for p in after if p in before and before[p] != after[p]]
    for verb, names in (("removed", removed), ("added", added), ("changed (size or time)", changed)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"{what}: {len(names)} {verb}: {shown}")
    return lines


def check_feature_cache(index_path: str | Path, recipe: Mapping[str, Any], vision_name: str = "vision") -> list[str]:
    """What differs between the cache recorded in ``index_path`` and ``recipe`` (empty: reuse it).

    Each difference is one readable line, e.g. ``model.vision.layer: 'last' -> 'penultimate'`` or
    ``source shards: 2 removed: train-000003.tar, train-000004.tar``; ``vision_name`` prefixes the
    vision fields.
    """
    path = Path(index_path)
    if not path.is_file():
        return [f"no cache at {path}"]
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("recipe")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        return [f"{path} is unreadable ({err})"]
    if not isinstance(old, dict) or old.get("version") != recipe["version"]:
        return [f"{path} records no recipe of this version (made by an older perceiver-vlm)"]
    lines = _file_changes("source shards", old.get("shards", []), recipe["shards"])
    old_vision, new_vision = old.get("vision", {}), recipe["vision"]
    for key in sorted(set(old_vision) | set(new_vision)):
        if old_vision.get(key, "<absent>") != new_vision.get(key, "<absent>"):
            lines.append(
                f"{vision_name}.{key}: {old_vision.get(key, '<absent>')!r} -> {new_vision.get(key, '<absent>')!r}"
            )
    lines += _file_changes("vision weights", old.get("weights", []), recipe["weights"])
    if old.get("preprocess") != recipe["preprocess"]:
        lines.append(f"preprocess: {old.get('preprocess')!r} -> {recipe['preprocess']!r}")
    return lines
