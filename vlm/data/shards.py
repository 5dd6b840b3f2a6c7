"""Writing webdataset shards: from any sample stream, a folder of images + CSV/JSONL captions, or the
img2dataset layout (``key.jpg`` + ``key.txt``/``key.json``).

A sample is one image (``jpg``/``png``/... bytes, stored as-is) plus ``json`` = ``{"captions": [...],
...}`` with one or more captions. Every shard is written with `vlm.io.AtomicFile` (a hidden temporary,
renamed when complete), so a reader never sees a half-written shard. Each call also writes
``{prefix}-index.json`` listing the shards and their sample counts.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.shardlists import expand_urls

from ..io import AtomicFile, atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "ShardSummary",
    "write_samples",
    "shards_from_folder",
    "shards_from_img2dataset",
    "resolve_shards",
]

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_IMAGE_COLUMNS = ("file", "filename", "image", "image_path", "path")
_CAPTION_COLUMNS = ("caption", "captions", "text")


@dataclass
class ShardSummary:
    shards: list[str]
    num_samples: int
    samples_per_shard: list[int]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        """All shards joined with ``::`` (a spec `resolve_shards` and webdataset both accept)."""
        return "::".join(self.shards)


def _sanitize_key(key: str) -> str:
    # webdataset splits "key.ext" at the first dot of the base name: keys must not contain dots.
    return key.replace(".", "_").replace("/", "_")


def write_samples(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    max_shard_bytes: float = 1e9,
    skipped: dict[str, int] | None = None,
) -> ShardSummary:
    """Write ``{"__key__": str, ext: bytes | dict | str, ...}`` samples to ``out_dir/prefix-NNNNNN.tar``.

    Values go through webdataset's extension-based encoder (dicts under ``json`` become JSON).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, AtomicFile] = {}
    finished: list[str] = []
    counts: list[int] = []

    def opener(fname: str):
        pending[fname] = AtomicFile(fname)
        return pending[fname].file

    def publish(fname: str) -> None:
        pending.pop(fname).commit()
        finished.append(fname)
        counts.append(sink.count)

    seen: set[str] = set()
    written = 0
    sink = wds.ShardWriter(
        str(out_dir / f"{prefix}-%06d.tar"),
        maxcount=samples_per_shard,
        maxsize=max_shard_bytes,
        post=publish,
        verbose=0,
        opener=opener,
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
            written += 1
    except BaseException:
        if sink.tarstream is not None:
            sink.tarstream.close()  # finish the tar stream so it never writes to the closed file later
            sink.tarstream = None
        for handle in pending.values():  # never publish a partial shard
            handle.abort()
        raise
    sink.close()
    summary = ShardSummary([str(f) for f in finished], written, counts, dict(skipped or {}))
    atomic_write(out_dir / f"{prefix}-index.json", json.dumps(asdict(summary), indent=1))
    log.info(
        "wrote %d samples to %d shards under %s (skipped: %s)", written, len(finished), out_dir, dict(skipped or {})
    )
    return summary


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies under ``root``: names from a captions file or a
    crawl never lead the writer to read files elsewhere (``../``, absolute paths, outward symlinks)."""
    return path.resolve().is_relative_to(root.resolve())


def _image_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else "tiff" if ext == "tif" else ext


def _read_caption_table(path: Path) -> dict[str, list[str]]:
    """image name -> captions, from CSV (header with image + caption columns) or JSONL."""
    rows: list[dict[str, Any]]
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"captions file {path} must be .csv, .tsv or .jsonl")
    table: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        image_col = next((c for c in _IMAGE_COLUMNS if c in row), None)
        caption_col = next((c for c in _CAPTION_COLUMNS if c in row), None)
        if image_col is None or caption_col is None:
            raise ValueError(
                f"{path} row {i}: needs an image column (one of {list(_IMAGE_COLUMNS)}) and a caption column "
                f"(one of {list(_CAPTION_COLUMNS)}); got {sorted(row)}"
            )
        value = row[caption_col]
        captions = value if isinstance(value, list) else [value]
        table.setdefault(str(row[image_col]), []).extend(str(c) for c in captions if c and str(c).strip())
    return table


def shards_from_folder(
    image_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
) -> ShardSummary:
    """Shards from ``image_dir`` + a CSV/JSONL naming each image (relative path) and its caption(s).

    Several rows for one image (or a JSON list under ``captions``) give several captions. Rows whose
    image is missing or empty are skipped and counted; the images themselves are checked by the reader.
    """
    image_dir = Path(image_dir)
    table = _read_caption_table(Path(captions_file))
    skipped: Counter[str] = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        for name, captions in table.items():
            path = image_dir / name
            if not _inside(image_dir, path):
                skipped["unsafe_path"] += 1
                continue
            if not path.is_file():
                skipped["missing_image"] += 1
                continue
            if not captions:
                skipped["missing_caption"] += 1
                continue
            data = path.read_bytes()
            if not data:
                skipped["empty_image"] += 1
                continue
            key = str(Path(name).with_suffix(""))
            yield {"__key__": key, _image_ext(path): data, "json": {"captions": captions, "source": name}}

    stream = list(samples())  # materialise first so `skipped` is complete when the index is written
    return write_samples(stream, out_dir, prefix, samples_per_shard, skipped=skipped)


def _img2dataset_captions(stem: Path, skipped: Counter[str]) -> tuple[list[str], dict[str, Any]] | None:
    captions: list[str] = []
    meta: dict[str, Any] = {}
    try:
        txt = stem.with_suffix(".txt")
        if txt.is_file():
            captions += [line.strip() for line in txt.read_bytes().decode("utf-8").splitlines() if line.strip()]
        meta_path = stem.with_suffix(".json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_bytes().decode("utf-8"))
            extra = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
            captions += [c for c in extra if isinstance(c, str) and c.strip() and c.strip() not in captions]
    except UnicodeDecodeError:
        skipped["bad_caption_encoding"] += 1
        return None
    except json.JSONDecodeError:
        skipped["bad_json"] += 1
        return None
    if not captions:
        skipped["missing_caption"] += 1
        return None
    return captions, meta


def shards_from_img2dataset(
    src_dir: str | Path, out_dir: str | Path, prefix: str = "shard", samples_per_shard: int = 1000
) -> ShardSummary:
    """Shards from img2dataset's "files" layout: ``key.jpg`` with ``key.txt`` (a caption per line)
    and/or ``key.json`` (``caption`` or ``captions``), in ``src_dir`` or its sub-folders."""
    src_dir = Path(src_dir)
    images = sorted(p for p in src_dir.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    skipped: Counter[str] = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        for path in images:
            if not _inside(src_dir, path):
                skipped["unsafe_path"] += 1
                continue
            found = _img2dataset_captions(path.with_suffix(""), skipped)
            if found is None:
                continue
            data = path.read_bytes()
            if not data:
                skipped["empty_image"] += 1
                continue
            captions, meta = found
            key = str(path.relative_to(src_dir).with_suffix(""))
            yield {"__key__": key, _image_ext(path): data, "json": {**meta, "captions": captions}}

    stream = list(samples())
    return write_samples(stream, out_dir, prefix, samples_per_shard, skipped=skipped)


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
