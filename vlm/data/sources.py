"""Sources of caption shards: images on disk named by a captions file, a COCO / Karpathy / NoCaps
annotation file, or an img2dataset download.

Every source makes one sample per image carrying all its captions (``json`` = ``{"captions": [...],
"image_id": ..., ...}``) and writes them with `vlm.data.shards.write_samples` (a whole new set, swapped
in when complete; an empty result is an error). Images are read one at a time while the shards are
written. A name from a captions file never leads outside the image folder (``../``, absolute paths,
outward symlinks): such rows are skipped and counted, like missing or empty images. A missing image
folder or captions file is an error naming the path.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .coco import CaptionRecord, read_coco_captions, read_karpathy
from .shards import IMAGE_EXTENSIONS, ShardSummary, write_samples

__all__ = [
    "shards_from_records",
    "shards_from_folder",
    "ANNOTATION_SOURCES",
    "shards_from_annotations",
    "shards_from_img2dataset",
]

log = logging.getLogger(__name__)
_IMAGE_COLUMNS = ("file", "filename", "image", "image_path", "path")
_CAPTION_COLUMNS = ("caption", "captions", "text")


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies under ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def _image_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else "tiff" if ext == "tif" else ext


def _image_folder(path: str | Path, what: str = "image folder") -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} does not exist" + (" (it is a file)" if folder.exists() else ""))
    return folder


def shards_from_records(
    records: Sequence[CaptionRecord],
    image_root: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    *,
    skipped: Counter[str] | None = None,
    allow_uncaptioned: bool = False,
    progress: bool = False,
) -> ShardSummary:
    """One sample per record: the image ``image_root / record.file`` + ``{"captions", **record.meta}``.

    Records whose image is unsafe, missing or empty (or, unless ``allow_uncaptioned``, that have no
    caption) are skipped and counted, on top of what ``skipped`` already holds.
    """
    root = _image_folder(image_root)
    skipped = Counter() if skipped is None else skipped

    def samples() -> Iterator[dict[str, Any]]:
        for record in tqdm(records, desc=f"shards {prefix}", unit="img", disable=not progress):
            path = root / record.file
            if not _inside(root, path):
                skipped["unsafe_path"] += 1
            elif not path.is_file():
                skipped["missing_image"] += 1
                if skipped["missing_image"] == 1:
                    log.warning("image %s named in the captions is missing; further ones are counted", path)
            elif not record.captions and not allow_uncaptioned:
                skipped["missing_caption"] += 1
            elif not (data := path.read_bytes()):
                skipped["empty_image"] += 1
            else:
                yield {
                    "__key__": record.key,
                    _image_ext(path): data,
                    "json": {"captions": record.captions, **record.meta},
                }

    return write_samples(samples(), out_dir, prefix, samples_per_shard, skipped=skipped)


def _read_caption_table(path: Path) -> dict[str, list[str]]:
    """image name -> captions, from CSV (header with image + caption columns) or JSONL."""
    rows: list[dict[str, Any]]
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
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
    if not any(table.values()):
        raise ValueError(f"captions file {path}: no usable row ({len(rows)} rows, none with a non-empty caption)")
    return table


def shards_from_folder(
    image_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    *,
    progress: bool = False,
) -> ShardSummary:
    """Shards from ``image_dir`` + a CSV/JSONL naming each image (relative path) and its caption(s).

    Several rows for one image (or a JSON list under ``captions``) give several captions.
    """
    table = _read_caption_table(Path(captions_file))
    records = [CaptionRecord(name, captions, {"source": name}) for name, captions in table.items()]
    return shards_from_records(records, image_dir, out_dir, prefix, samples_per_shard, progress=progress)


ANNOTATION_SOURCES = ("coco", "karpathy", "nocaps")


def shards_from_annotations(
    source: str,
    annotations_file: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    *,
    split: str = "",
    progress: bool = False,
) -> ShardSummary:
    """Shards from a dataset's annotation file + its images, ``source`` one of:

    - ``coco``: a captions file (``captions_val2014.json``) + its image folder (``val2014/``);
    - ``karpathy``: one ``split`` of Karpathy's split file (``dataset_coco.json``: images under
      ``image_dir/<filepath>/``, i.e. the folder holding ``train2014/`` and ``val2014/``; Flickr30k: the
      image folder itself);
    - ``nocaps``: NoCaps' val captions (10 per image) + its image folder, or its test image info (no
      captions: the samples carry ``captions: []`` and serve prediction only; the NoCaps server scores test).
    """
    if source not in ANNOTATION_SOURCES:
        raise ValueError(f"annotation source must be one of {ANNOTATION_SOURCES}, got {source!r}")
    _image_folder(image_dir)
    skipped: Counter[str] = Counter()
    if source == "karpathy":
        records = read_karpathy(annotations_file, split, skipped=skipped)
    else:
        records = read_coco_captions(annotations_file, require_captions=source == "coco", skipped=skipped)
    for r in records:
        r.meta["source"] = source
    uncaptioned = source == "nocaps" and not any(r.captions for r in records)  # the test split's image info
    return shards_from_records(
        records, image_dir, out_dir, prefix, samples_per_shard,
        skipped=skipped, allow_uncaptioned=uncaptioned, progress=progress,
    )  # fmt: skip


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
    src_dir: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    *,
    progress: bool = False,
) -> ShardSummary:
    """Shards from img2dataset's "files" layout: ``key.jpg`` with ``key.txt`` (a caption per line)
    and/or ``key.json`` (``caption`` or ``captions``), in ``src_dir`` or its sub-folders."""
    src_dir = _image_folder(src_dir, "img2dataset output folder")
    images = sorted(p for p in src_dir.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    skipped: Counter[str] = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        for path in tqdm(images, desc=f"shards {prefix}", unit="img", disable=not progress):
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

    return write_samples(samples(), out_dir, prefix, samples_per_shard, skipped=skipped)
