"""What a run makes before it trains: shards, the synthetic world, the stand-in backbones, the feature cache.

Each step makes its output once and reuses it on the next run (a marker or index file says it is
complete); rank 0 does the work while the other ranks wait at a barrier. `prepare` runs the steps a
config asks for and returns the config with the resulting paths filled in; `split_spec` says which
shards a split is read from.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from resampler.config import to_dict

from ..backbones import ensure_standin_backbones
from ..data.features import check_feature_cache, feature_recipe, precompute_features
from ..data.reader import CaptionLoader
from ..data.shards import ShardSummary
from ..data.sources import shards_from_annotations, shards_from_folder, shards_from_img2dataset
from ..data.synthetic import write_synthetic_shards
from ..distributed import barrier, print0, rank
from ..io import atomic_write
from ..towers import load_vision_tower
from .config import RunConfig

__all__ = [
    "prepare",
    "make_shards",
    "make_synthetic_world",
    "ensure_standins",
    "ensure_feature_cache",
    "split_spec",
]

_DONE = ".complete"


def prepare(cfg: RunConfig, *, features: bool = True) -> RunConfig:
    """Make what the config asks for and is not there yet: the synthetic world, the stand-in
    backbones, the feature cache. Returns the config with the resulting paths filled in."""
    if cfg.make_synthetic:
        cfg = make_synthetic_world(cfg)
    if cfg.standin.enabled:
        cfg = ensure_standins(cfg)
    if features and cfg.data.use_cached_features and cfg.features.splits:
        ensure_feature_cache(cfg)
    return cfg


def make_shards(cfg: RunConfig) -> ShardSummary | None:
    """``shards.source`` -> the shard set ``<data_dir>/<prefix>-*.tar`` (see `ShardsConfig`)."""
    src = cfg.shards
    if src.source == "synthetic":
        make_synthetic_world(replace(cfg, make_synthetic=True))
        return None
    needs = {"folder": ("input_dir", "captions_file"), "img2dataset": ("input_dir",)}.get(
        src.source, ("input_dir", "annotations_file")
    )
    missing = [f"shards.{name}" for name in needs if not getattr(src, name)]
    if src.source == "karpathy" and not src.split:
        missing.append("shards.split (train, restval, val or test)")
    if missing:
        raise ValueError(f"shards.source={src.source!r} needs {', '.join(missing)}")
    where = (cfg.data_dir, src.shard_prefix, src.samples_per_shard)
    progress = src.progress and rank() == 0
    if src.source == "folder":
        summary = shards_from_folder(src.input_dir, src.captions_file, *where, progress=progress)
    elif src.source in ("coco", "karpathy", "nocaps"):
        summary = shards_from_annotations(
            src.source, src.annotations_file, src.input_dir, *where, split=src.split, progress=progress
        )
    else:
        summary = shards_from_img2dataset(src.input_dir, *where, progress=progress)
    n = len(summary.shards)
    print0(
        f"wrote {summary.num_samples} samples to {n} shards {cfg.data_dir / src.shard_prefix}-*.tar; "
        f"skipped {summary.skipped or 'nothing'}"
    )
    return summary


def make_synthetic_world(cfg: RunConfig) -> RunConfig:
    """Write the synthetic world's splits to ``data_dir`` once (a marker file says it is complete)."""
    out = cfg.data_dir
    marker = out / _DONE
    record = json.dumps(to_dict(cfg.synthetic), sort_keys=True)
    if not (marker.is_file() and marker.read_text() == record):
        if rank() == 0:
            start = time.perf_counter()
            sizes = cfg.synthetic.split_sizes
            print0(f"synthetic world: writing {sizes} images of {cfg.synthetic.image_size} px to {out}")
            write_synthetic_shards(cfg.synthetic, out)
            atomic_write(marker, record)
            print0(f"synthetic world: done in {time.perf_counter() - start:.1f} s")
        barrier()
    data = cfg.data
    data = replace(
        data,
        train_shards=data.train_shards or str(out / "train-*.tar"),
        val_shards=data.val_shards or str(out / "val-*.tar"),
        test_shards=data.test_shards or str(out / "test-*.tar"),
    )
    return replace(cfg, data=data)


def ensure_standins(cfg: RunConfig) -> RunConfig:
    """Train (rank 0) or reuse the stand-in backbones and point ``model.vision``/``model.lm`` at them."""
    if rank() == 0:
        paths = ensure_standin_backbones(cfg.standin, cfg.standin_dir, lambda: _standin_pairs(cfg), log=print0)
    barrier()
    if rank() != 0:
        paths = ensure_standin_backbones(cfg.standin, cfg.standin_dir, lambda: _standin_pairs(cfg), log=lambda m: None)
    model = cfg.model
    model = replace(
        model,
        vision=replace(model.vision, name=paths["vision_name"], pretrained=paths["vision_pretrained"]),
        lm=replace(model.lm, name_or_path=paths["lm_dir"]),
    )
    return replace(cfg, model=model)


def _standin_pairs(cfg: RunConfig) -> tuple[torch.Tensor, list[list[str]]]:
    """The training split in memory: preprocessed images (N, 3, H, W) and every caption of each."""
    import open_clip

    if not cfg.data.train_shards:
        raise ValueError("standin.enabled needs training shards: set data.train_shards or make_synthetic: true")
    size = cfg.standin.vision.image_size
    read = replace(cfg.data, use_cached_features=False, batch_size=512, num_workers=0, image_size=size)
    loader = CaptionLoader(cfg.data.train_shards, read, transform=open_clip.image_transform(size, False), train=False)
    images, captions = [], []
    for batch in loader:
        images.append(batch["images"])
        captions += batch.references
    return torch.cat(images), captions


def ensure_feature_cache(cfg: RunConfig) -> None:
    """Encode each split in ``features.splits`` with the frozen tower (rank 0; the others wait) unless
    its cache records exactly the shards, ``model.vision`` section and preprocessing of this run; a
    cache built from anything else is rebuilt, or refused with ``features.on_change: error``."""
    if rank() == 0:
        tower = load_vision_tower(cfg.model.vision)  # open_clip or transformers, from config.vision alone
        preprocess = tower.preprocess
        vision = to_dict(cfg.model.vision)
        todo = []
        for split in cfg.features.splits:
            source = _raw_split_spec(cfg, split)
            index = cfg.features_dir / f"{split}-features.json"
            changes = check_feature_cache(index, feature_recipe(source, vision, preprocess), "model.vision")
            if changes and index.is_file():
                if cfg.features.on_change == "error":
                    raise ValueError(
                        f"feature cache {index} was built from other inputs: {'; '.join(changes)}. "
                        "Delete it or set features.on_change=rebuild"
                    )
                print0(f"feature cache: {split}: rebuilding, it was built from other inputs: {'; '.join(changes)}")
            if changes:
                todo.append((split, source))
        if todo:
            read = replace(cfg.data, batch_size=cfg.features.batch_size, use_cached_features=False)
        for split, source in todo:
            start = time.perf_counter()
            summary = precompute_features(
                source, cfg.features_dir, tower, read, prefix=split, transform=preprocess, vision=vision
            )
            seconds = time.perf_counter() - start
            print0(f"feature cache: {split}: {summary.num_samples} images in {seconds:.1f} s -> {cfg.features_dir}")
    barrier()


def _raw_split_spec(cfg: RunConfig, split: str) -> str:
    spec = {"train": cfg.data.train_shards, "val": cfg.data.val_shards, "test": cfg.data.test_shards}.get(split)
    if spec:
        return spec
    guess = cfg.data_dir / f"{split}-*.tar"
    if list(guess.parent.glob(guess.name)):
        return str(guess)
    raise ValueError(f"no shards for split {split!r}: set data.{split}_shards (known splits: train, val, test)")


def split_spec(cfg: RunConfig, split: str) -> str:
    """The shards a split is read from: the feature cache when ``data.use_cached_features`` and the
    split was cached, else the raw shards."""
    if cfg.data.use_cached_features and split in cfg.features.splits:
        return str(cfg.features_dir / f"{split}-*.tar")
    return _raw_split_spec(cfg, split)
