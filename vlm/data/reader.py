"""Reading caption shards: tar parsing, shuffling, node/worker splitting, decoding (`vlm.data.decode`), batching.

``CaptionLoader(shards, config, transform=..., text=processor)`` yields `CaptionBatch` dicts ready for
``model(**batch)``: ``images`` (B, 3, H, W) — or ``image_features`` (B, P, D) from a feature cache —
plus ``input_ids``/``attention_mask``/``labels`` when a text processor is given. Keys, the chosen
caption, every reference caption and the stored JSON ride along as attributes (``batch.sample_keys``,
``batch.captions``, ``batch.references``, ``batch.meta``) so they never reach the model.

Splitting: shards are dealt to the ``world_size * num_workers`` readers when there are at least that
many; with fewer shards, every reader reads all shards and keeps every n-th sample, so no reader
starves. Everything random (shard order, sample buffer, caption choice, resampling) is seeded by
``(seed, epoch, rank, worker)``: the same epoch gives the same batches, which is what resume relies on.

Bad samples (0-byte, corrupt or truncated images, decompression bombs, missing or non-UTF-8 captions,
unreadable features, broken tar members) are skipped and counted by reason, never fatal (missing or
unreadable shards count as ``broken_tar``, cut ones as ``truncated_shard``); images in
other modes (grayscale, RGBA, palette, CMYK, 16-bit) are converted to RGB and counted as converted.
``loader.bad_samples`` / ``loader.converted`` hold the counts (summed over workers) and a summary is
logged at the end of every pass.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from .. import distributed
from ..processor import IGNORE_INDEX
from ..training.interrupt import ignore_stop_signals
from .config import DataConfig
from .decode import FEATURES_EXT, BadSample, build_transform, decode_image, read_captions, read_features
from .memory import ShardMemo
from .shards import IMAGE_EXTENSIONS, resolve_shards

__all__ = ["CaptionBatch", "CaptionDataset", "CaptionLoader"]

log = logging.getLogger(__name__)


class CaptionBatch(dict):
    """Model inputs (the dict items) plus per-sample metadata as attributes."""

    sample_keys: list[str]
    captions: list[str]
    references: list[list[str]]
    meta: list[dict[str, Any]]
    pixels: np.ndarray | None  # (B, H, W, 3) uint8 when the loader keeps them (for sample grids)
    raw: list[dict[str, bytes]] | None  # the stored tar members per sample, with keep_raw
    stats: tuple[int, dict[str, int], dict[str, int]] | None  # (worker, skipped, converted) so far


# ----------------------------------------------------------------------------------------------
# Text


def _text_example(text: Any, prompt: str, caption: str, max_tokens: int) -> dict[str, list[int]]:
    """One caption -> unpadded ids/labels, the caption part truncated to ``max_tokens`` (eos included)."""
    if hasattr(text, "build_inputs"):  # the VLM's processor: <image> placeholders, prompt, label masking
        example = text.build_inputs(prompt, caption, num_images=1, max_caption_tokens=max_tokens)
        prefix = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), 0)
        keep = prefix + max_tokens
        return {"input_ids": example["input_ids"][:keep], "labels": example["labels"][:keep]}
    ids = text(caption, truncation=True, max_length=max_tokens)["input_ids"]  # a plain HF tokenizer
    return {"input_ids": list(ids), "labels": list(ids)}


def _pad_text(text: Any, examples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
    if hasattr(text, "pad") and hasattr(text, "build_inputs"):
        return text.pad(examples)
    pad_id = getattr(text, "pad_token_id", None) or 0
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------
# The dataset


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


class CaptionDataset(torch.utils.data.IterableDataset):
    """Batches (not samples) from caption shards; see the module docstring. Use through `CaptionLoader`.

    Args:
        shards: a shard spec (see `resolve_shards`).
        config: `DataConfig` (batch size, shuffling, resampling, image size, caption length...).
        transform: PIL image -> (3, H, W) tensor; default `build_transform(config)`.
        text: the VLM's processor (``build_inputs``/``pad``) or a HF tokenizer; None = no token tensors.
        prompt: the text prompt of every example (with or without ``<image>``), for ``build_inputs``.
        train: False = evaluation order: no shuffling, no resampling, always the first caption.
        keep_pixels: also return the decoded images as ``batch.pixels`` (uint8) for sample grids.
        keep_raw: also return each sample's stored members (bytes) as ``batch.raw`` (for re-sharding).
        allow_uncaptioned: keep samples with no caption (``references`` ``[]``): images to predict only.
        rank, world_size: override the torch.distributed values (tests, custom launchers).
    """

    def __init__(
        self,
        shards: str | list[str],
        config: DataConfig,
        *,
        transform: Callable[[Image.Image], Tensor] | None = None,
        text: Any = None,
        prompt: str = "",
        train: bool = True,
        keep_pixels: bool = False,
        keep_raw: bool = False,
        allow_uncaptioned: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.urls = resolve_shards(shards)
        self.config = config
        self.transform = transform if transform is not None or config.use_cached_features else build_transform(config)
        self.text, self.prompt, self.train = text, prompt, train
        self.keep_pixels, self.keep_raw, self.allow_uncaptioned = keep_pixels, keep_raw, allow_uncaptioned
        if allow_uncaptioned and (train or text is not None):
            raise ValueError("allow_uncaptioned serves prediction only: use it with train=False and no text processor")
        self.rank, self.world_size = rank, world_size
        self._main_process_rank: tuple[int, int] | None = None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _slot(self) -> tuple[int, int, int]:
        """(this reader's index, number of readers, worker id) over all ranks and DataLoader workers."""
        # DataLoader workers may be spawned (no process group there): prefer what the loader saw in the main process.
        here, world = self._main_process_rank or (distributed.rank(), distributed.world_size())
        here = here if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return here * workers + worker, world * workers, worker

    def _shard_stream(self, slot: int, slots: int, rng: random.Random) -> tuple[Iterator[dict[str, str]], bool]:
        """Shard urls this reader opens, and whether samples still need splitting between readers."""
        cfg = self.config
        if cfg.resampled and self.train:  # endless, with replacement; every reader draws its own shards
            return (dict(url=rng.choice(self.urls)) for _ in iter(int, 1)), False
        urls = list(self.urls)
        if cfg.shard_shuffle and self.train:
            random.Random(_seed(cfg.seed, self.epoch)).shuffle(urls)  # same order on every reader
        if len(urls) >= slots:
            return (dict(url=u) for u in urls[slot::slots]), False
        return (dict(url=u) for u in urls), slots > 1

    def __iter__(self) -> Iterator[CaptionBatch]:
        cfg = self.config
        slot, slots, worker = self._slot()
        rng = random.Random(_seed(cfg.seed, self.epoch, slot, 1))
        skipped: Counter[str] = Counter()
        converted: Counter[str] = Counter()

        def tar_error(err: Exception) -> bool:
            skipped["broken_tar"] += 1
            log.warning("skipping unreadable shard data: %s", err)
            return True  # keep going

        def checked(stream: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
            for shard in stream:
                # Python's tarfile ends a cut archive quietly; a size off the 512-byte grid gives it away.
                if os.path.isfile(shard["url"]) and os.path.getsize(shard["url"]) % 512:
                    skipped["truncated_shard"] += 1
                    log.warning("shard %s is truncated; reading the samples before the cut", shard["url"])
                yield shard

        shard_stream, split_samples = self._shard_stream(slot, slots, rng)
        expand = wds.tarfile_to_samples(handler=tar_error)
        memo = self._shard_memo()
        if memo is None:
            samples: Iterator[dict[str, Any]] = expand(checked(shard_stream))
        else:
            samples = self._remembered(shard_stream, lambda shard: expand(checked(iter([shard]))), memo, skipped)
        if split_samples:
            samples = (s for i, s in enumerate(samples) if i % slots == slot)
        if cfg.sample_shuffle > 1 and self.train:
            samples = wds.shuffle(
                cfg.sample_shuffle, initial=cfg.sample_shuffle, seed=_seed(cfg.seed, self.epoch, slot, 2)
            )(samples)

        items: list[dict[str, Any]] = []
        reported = (0, 0)
        for sample in samples:
            try:
                items.append(self._decode(sample, rng, converted))
            except BadSample as bad:
                skipped[bad.reason] += 1
                if skipped[bad.reason] == 1:
                    log.warning("skipping bad sample %s (%s); further ones are counted", sample.get("__key__"), bad)
                continue
            if len(items) == cfg.batch_size:
                yield self._collate(items, (worker, dict(skipped), dict(converted)))
                items, reported = [], (skipped.total(), converted.total())
        if items and not (cfg.drop_last and self.train):
            yield self._collate(items, (worker, dict(skipped), dict(converted)))
        elif (skipped.total(), converted.total()) != reported:
            marker = CaptionBatch()
            marker.stats = (worker, dict(skipped), dict(converted))
            yield marker  # counts only; `CaptionLoader` swallows it

    def _shard_memo(self) -> ShardMemo | None:
        """This reader's `ShardMemo` when ``features_in_memory_mb`` asks for one (training on cached features)."""
        cfg = self.config
        if not (self.train and cfg.use_cached_features and cfg.features_in_memory_mb > 0) or self.keep_raw:
            return None
        if "_memo" not in self.__dict__:
            self._memo = ShardMemo(cfg.features_in_memory_mb, keep_images=self.keep_pixels)
        return self._memo

    @staticmethod
    def _remembered(shards, read, memo: ShardMemo, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        """The samples of each shard: replayed from ``memo``, or read (and offered to it when read cleanly)."""
        for shard in shards:
            kept = memo.get(shard["url"])
            if kept is not None:
                yield from kept
                continue
            if memo.used >= memo.budget:  # full: read as without a memo, nothing gathered
                yield from read(shard)
                continue
            errors = skipped["broken_tar"] + skipped["truncated_shard"]
            samples = []
            for sample in read(shard):
                samples.append(memo.compact(sample))
                yield samples[-1]
            if skipped["broken_tar"] + skipped["truncated_shard"] == errors:
                memo.offer(shard["url"], samples)

    def _decode(self, sample: dict[str, Any], rng: random.Random, converted: Counter[str]) -> dict[str, Any]:
        cfg = self.config
        captions, meta = read_captions(sample, allow_empty=self.allow_uncaptioned)
        item: dict[str, Any] = {"key": sample["__key__"], "references": captions, "meta": meta}
        if not captions:
            item["caption"] = ""
        elif cfg.caption_choice == "first" or not self.train:
            item["caption"] = captions[0]
        else:
            item["caption"] = rng.choice(captions)
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if cfg.use_cached_features:
            if FEATURES_EXT not in sample:
                raise BadSample("missing_features", "this shard has no cached features (see vlm.data.features)")
            stored = sample[FEATURES_EXT]  # bytes, or a tensor `ShardMemo` decoded before
            item["image_features"] = stored.float() if isinstance(stored, Tensor) else read_features(stored)
        if image_ext is None and (not cfg.use_cached_features or self.keep_pixels):
            raise BadSample("missing_image")
        if not cfg.use_cached_features or self.keep_pixels:
            image, mode = decode_image(sample[image_ext], cfg.max_image_pixels)
            if mode is not None:
                converted[mode] += 1
            if not cfg.use_cached_features:
                item["images"] = self.transform(image)
            if self.keep_pixels:
                item["pixels"] = np.asarray(image.resize((cfg.image_size, cfg.image_size)), dtype=np.uint8)
        if self.keep_raw:
            item["raw"] = {k: v for k, v in sample.items() if not k.startswith("__")}
        if self.text is not None:
            item["text"] = self._tokenized(item["caption"])
        return item

    def _tokenized(self, caption: str) -> dict[str, list[int]]:
        """Tokenize through the processor, memoised per reader (captions repeat across images)."""
        cache = self.__dict__.setdefault("_text_cache", {})
        if caption not in cache:
            if len(cache) >= 200_000:
                cache.clear()
            cache[caption] = _text_example(self.text, self.prompt, caption, self.config.max_caption_tokens)
        example = cache[caption]
        return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}

    def _collate(self, items: list[dict[str, Any]], stats) -> CaptionBatch:
        batch = CaptionBatch()
        for name in ("images", "image_features"):
            if name in items[0]:
                shapes = {tuple(it[name].shape) for it in items}
                if len(shapes) > 1:
                    raise ValueError(f"{name} of one batch must share a shape, got {sorted(shapes)}")
                batch[name] = torch.stack([it[name] for it in items])  # (B, 3, H, W) or (B, P, D)
        if self.text is not None:
            batch.update(_pad_text(self.text, [it["text"] for it in items]))
        batch.sample_keys = [it["key"] for it in items]
        batch.captions = [it["caption"] for it in items]
        batch.references = [it["references"] for it in items]
        batch.meta = [it["meta"] for it in items]
        batch.pixels = np.stack([it["pixels"] for it in items]) if self.keep_pixels else None
        batch.raw = [it["raw"] for it in items] if self.keep_raw else None
        batch.stats = stats
        return batch


# ----------------------------------------------------------------------------------------------
# The loader


def _passthrough(batch: CaptionBatch) -> CaptionBatch:
    return batch


_OPEN_WORKERS: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators of unfinished worker-backed passes


def _stop_workers(iterator: Any) -> None:
    stop = getattr(iterator, "_shutdown_workers", None)  # torch's orderly stop: done event, join (idempotent)
    if stop is not None:
        stop()


@atexit.register  # runs before multiprocessing's own exit hook (registered earlier, run later)
def _stop_open_workers() -> None:
    """Stop the workers of passes still open at exit (a ``for`` loop left with ``break`` while its
    generator stays referenced). Workers ignore SIGTERM (the main process handles stop signals), and
    SIGTERM is how multiprocessing ends daemon children at exit: without this, exit would wait forever."""
    for iterator in list(_OPEN_WORKERS):
        _stop_workers(iterator)


class CaptionLoader:
    """A DataLoader over `CaptionDataset` that gathers bad-sample counts from its workers.

    Iterating gives `CaptionBatch` dicts; ``set_epoch(e)`` picks the epoch's shuffles (call it
    before iterating; a `resampled` loader is endless). ``bad_samples``/``converted`` are summed over
    workers and every pass so far; ``last_pass_stats`` holds the counts of the latest pass.
    """

    def __init__(self, shards: str | list[str], config: DataConfig, **dataset_kwargs: Any) -> None:
        self.dataset = CaptionDataset(shards, config, **dataset_kwargs)
        self.config = config
        self._passes: list[dict[int, tuple[dict[str, int], dict[str, int]]]] = []

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def __iter__(self) -> Iterator[CaptionBatch]:
        workers = self.config.num_workers
        self.dataset._main_process_rank = (distributed.rank(), distributed.world_size())
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_passthrough,
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
            worker_init_fn=ignore_stop_signals if workers else None,  # the main process handles Ctrl-C / SIGTERM
        )
        per_worker: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        self._passes.append(per_worker)
        batches = iter(loader)
        if workers:
            _OPEN_WORKERS.add(batches)
        try:
            for batch in batches:
                worker, skipped, converted = batch.stats
                per_worker[worker] = (skipped, converted)  # cumulative within the pass
                if len(batch):
                    yield batch
        finally:  # also when the pass is closed early (generator.close(), e.g. by BatchStream.close)
            _stop_workers(batches)
            _OPEN_WORKERS.discard(batches)
        skipped, converted = self.last_pass_stats
        if skipped or converted:
            log.info("data pass done: skipped %s, converted %s", dict(skipped), dict(converted))

    def _sum(self, passes, index: int) -> Counter[str]:
        total: Counter[str] = Counter()
        for per_worker in passes:
            for counts in per_worker.values():
                total.update(counts[index])
        return total

    @property
    def bad_samples(self) -> Counter[str]:
        """Skipped samples by reason (``empty_image``, ``corrupt_image``, ``missing_caption``, ...)."""
        return self._sum(self._passes, 0)

    @property
    def converted(self) -> Counter[str]:
        """Images converted to RGB, by original PIL mode (``L``, ``RGBA``, ``P``, ``CMYK``, ``I;16``...)."""
        return self._sum(self._passes, 1)

    @property
    def last_pass_stats(self) -> tuple[Counter[str], Counter[str]]:
        passes = self._passes[-1:]
        return self._sum(passes, 0), self._sum(passes, 1)
