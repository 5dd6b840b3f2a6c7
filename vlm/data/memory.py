"""Training shards kept in memory after their first pass (``data.features_in_memory_mb``).

Training on cached features reads the same shards every epoch, and at small model sizes parsing the
tar members and decoding the ``.npy`` features is a visible share of each step. `ShardMemo` keeps
what a shard's first pass produced — its samples in tar order, features decoded (in their stored
dtype), image bytes dropped when nothing needs them — and replays it in later passes. The reader's
shard order, shuffle buffer, sample split and caption choice run on the replayed samples exactly as
on freshly read ones, so the batches are the same. A shard is kept only when it read without tar
errors (a broken or cut shard is read from disk again, and its errors counted again) and only while
the memory budget lasts; samples with unreadable features keep their bytes, so the reader skips and
counts them on every pass as before.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor

from .decode import FEATURES_EXT, BadSample, read_features
from .shards import IMAGE_EXTENSIONS

__all__ = ["ShardMemo"]


class ShardMemo:
    """Samples of whole shards, by url, up to ``budget_mb`` megabytes (decoded features counted)."""

    def __init__(self, budget_mb: int, *, keep_images: bool = False) -> None:
        self.budget = int(budget_mb) * 2**20
        self.keep_images = keep_images
        self.used = 0
        self._shards: dict[str, list[dict[str, Any]]] = {}

    def __contains__(self, url: str) -> bool:
        return url in self._shards

    def get(self, url: str) -> list[dict[str, Any]] | None:
        return self._shards.get(url)

    def compact(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample as it is kept: features decoded, image bytes dropped unless ``keep_images``."""
        kept = {k: v for k, v in sample.items() if self.keep_images or k not in IMAGE_EXTENSIONS}
        if FEATURES_EXT in kept:
            with contextlib.suppress(BadSample):  # unreadable: bytes kept, skipped and counted on every pass
                kept[FEATURES_EXT] = read_features(kept[FEATURES_EXT], float32=False)
        return kept

    def offer(self, url: str, samples: list[dict[str, Any]]) -> bool:
        """Keep one whole shard's compacted samples if they fit the budget; returns whether kept."""
        size = sum(_nbytes(v) for sample in samples for v in sample.values())
        if url in self._shards or self.used + size > self.budget:
            return False
        self._shards[url] = samples
        self.used += size
        return True


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return len(value) if isinstance(value, bytes | str) else 0
