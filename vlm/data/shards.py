"""Writing and finding webdataset shards.

A sample is one image (``jpg``/``png``/... bytes, stored as-is) plus ``json`` = ``{"captions": [...],
...}`` with one or more captions. `write_samples` writes a whole shard set ``{prefix}-NNNNNN.tar`` plus
``{prefix}-index.json`` (shards, sample counts, byte sizes, skip counts) under a hidden staging name
and swaps it in for the previous set of the same prefix only when every shard is complete
(`vlm.io.atomic_file_set`): a run that fails or finds nothing leaves the previous set as it was, and
shards of an earlier, longer run never survive beside a new set. Sources that turn files on disk into
samples are in `vlm.data.sources`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.shardlists import expand_urls

from ..io import atomic_file_set

__all__ = ["IMAGE_EXTENSIONS", "ShardSummary", "EmptyShardSet", "write_samples", "shard_set_files", "resolve_shards"]

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class EmptyShardSet(ValueError):
    """A shard set would hold no sample; nothing was written and the previous set is untouched."""


@dataclass
class ShardSummary:
    shards: list[str]
    num_samples: int
    samples_per_shard: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    shard_bytes: list[int] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        """All shards joined with ``::`` (a spec `resolve_shards` and webdataset both accept)."""
        return "::".join(self.shards)


def _sanitize_key(key: str) -> str:
    # webdataset splits "key.ext" at the first dot of the base name: keys must not contain dots.
    return key.replace(".", "_").replace("/", "_")


def shard_set_files(out_dir: str | Path, prefix: str) -> list[Path]:
    """The files of the shard set ``prefix`` in ``out_dir``: ``{prefix}-NNNNNN.tar`` and ``{prefix}-index.json``
    (exactly: the set ``train`` does not include ``train-big-000000.tar``)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    shard = re.compile(rf"{re.escape(prefix)}-\d{{6,}}\.tar")
    return sorted(p for p in out_dir.iterdir() if shard.fullmatch(p.name) or p.name == f"{prefix}-index.json")


def write_samples(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_shard_bytes: float = 1e9,
    skipped: Mapping[str, int] | None = None,
) -> ShardSummary:
    """Write ``{"__key__": str, ext: bytes | dict | str, ...}`` samples as the shard set ``out_dir/prefix-*``.

    Values go through webdataset's extension-based encoder (dicts under ``json`` become JSON).
    ``skipped`` (a counter the sample stream fills as it goes) is read after the stream is exhausted
    and recorded in the index. Raises `EmptyShardSet` when the stream yields no sample.
    """
    out_dir = Path(out_dir)
    if "/" in prefix or not prefix:
        raise ValueError(f"shard prefix must be a plain non-empty name, got {prefix!r}")
    index_name = f"{prefix}-index.json"
    finished: list[str] = []
    counts: list[int] = []
    seen: set[str] = set()
    with atomic_file_set(out_dir, lambda: shard_set_files(out_dir, prefix), index=index_name) as staging:

        def publish(fname: str) -> None:
            finished.append(Path(fname).name)
            counts.append(sink.count)

        sink = wds.ShardWriter(
            str(staging / f"{prefix}-%06d.tar"),
            maxcount=samples_per_shard,
            maxsize=max_shard_bytes,
            post=publish,
            verbose=0,
            mtime=0,  # reproducible bytes; an int (a float mtime adds a pax header per member, slower to read)
        )
        try:
            for sample in samples:
                key = sample.get("__key__")
                if not isinstance(key, str) or not key:
                    raise ValueError(f"every sample needs a non-empty string '__key__', got {key!r}")
                key = _sanitize_key(key)
                if key in seen:
                    raise ValueError(f"duplicate sample key {key!r}: keys must be unique within a dataset")
                seen.add(key)
                sink.write({**sample, "__key__": key})
        except BaseException:
            with contextlib.suppress(Exception):
                sink.close()  # the staging directory goes; the error that stopped the stream is what counts
            raise
        sink.close()
        skips = dict(skipped or {})
        if not seen:
            raise EmptyShardSet(
                f"no sample to write as {out_dir / prefix}-*.tar (skipped: {skips or 'nothing'}); "
                "the previous shards of this prefix, if any, are left as they were"
            )
        sizes = [(staging / name).stat().st_size for name in finished]
        summary = ShardSummary([str(out_dir / name) for name in finished], len(seen), counts, skips, sizes)
        (staging / index_name).write_text(json.dumps(asdict(summary), indent=1), encoding="utf-8")
    log.info("wrote %d samples to %d shards under %s (skipped: %s)", len(seen), len(finished), out_dir, skips)
    return summary


def resolve_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a brace pattern, glob, directory, list, or ``::``-joined mix of those."""
    parts = spec if isinstance(spec, list) else [p for p in str(spec).split("::") if p]
    urls: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            urls += sorted(glob.glob(os.path.join(part, "*.tar")))
        elif any(ch in part for ch in "*?["):
            urls += sorted(glob.glob(part))
        else:
            urls += expand_urls(part)  # brace patterns
    if not urls:
        raise ValueError(f"no shards match {spec!r}: expected a brace pattern, glob, directory or list of .tar files")
    return urls
