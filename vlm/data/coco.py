"""The captioning annotation files of the field: COCO captions, NoCaps, the Karpathy splits, COCO results.

Reading (for ``pvlm-make-shards``): each reader returns one `CaptionRecord` per image with *all* its
captions and the image's id, ready for `vlm.data.sources.shards_from_records`.

- COCO (``captions_train2014.json``, ``captions_val2014.json``) and NoCaps (``nocaps_val_4500_captions.json``;
  ``nocaps_test_image_info.json`` has no captions): ``{"images": [{"id", "file_name", ...}],
  "annotations": [{"id", "image_id", "caption"}]}``. NoCaps images also carry ``domain`` and
  ``open_images_id``, kept in the record.
- Karpathy (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``): ``{"images":
  [{"filepath" (COCO only), "filename", "split", "sentences": [{"raw", ...}], "cocoid" (COCO) |
  "imgid"}]}``; ``split`` picks train / restval / val / test (``+`` joins several).

Writing and reading the COCO evaluation formats (for ``pvlm-eval``): a results file is ``[{"image_id":
int, "caption": str}, ...]``, one per image, which pycocoevalcap's ``COCOEvalCap`` scores against an
annotations file in the layout above (`coco_annotations` writes one for any split).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CaptionRecord",
    "KARPATHY_SPLITS",
    "read_json",
    "read_coco_captions",
    "read_karpathy",
    "coco_image_ids",
    "coco_annotations",
    "coco_results",
    "read_coco_results",
    "coco_references",
]

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_NOCAPS_FIELDS = ("domain", "open_images_id", "coco_url", "height", "width")


@dataclass
class CaptionRecord:
    """One image: its path under the image root, all its captions, and what the sample's json keeps."""

    file: str
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # the sample key; default: ``file`` without its suffix

    def __post_init__(self) -> None:
        self.key = self.key or str(Path(self.file).with_suffix(""))


def read_json(path: str | Path, what: str) -> Any:
    """JSON from ``path``; a missing file or broken JSON is a clear error naming ``what`` the file is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid UTF-8 JSON: {err}") from None


def _clean(caption: Any) -> str | None:
    return " ".join(caption.split()) if isinstance(caption, str) and caption.strip() else None


def read_coco_captions(
    path: str | Path, *, require_captions: bool = True, skipped: Counter[str] | None = None
) -> list[CaptionRecord]:
    """Images of a COCO-layout captions file (COCO, NoCaps), each with all its captions, in file order.

    ``require_captions=False`` accepts a file without ``annotations`` (NoCaps test image info): every
    image becomes a record with no caption. Images without any caption are otherwise skipped and
    counted in ``skipped``; a file where no image has a caption is an error.
    """
    skipped = Counter() if skipped is None else skipped
    data = read_json(path, "captions file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"captions file {path}: expected COCO's layout {{'images': [...], 'annotations': [...]}}")
    has_annotations = isinstance(data.get("annotations"), list)
    if require_captions and not has_annotations:
        raise ValueError(f"captions file {path} has no 'annotations' list: no image has a caption")
    images: dict[int, dict[str, Any]] = {}
    for row in data["images"]:
        if not isinstance(row, dict) or not isinstance(row.get("id"), int) or not isinstance(row.get("file_name"), str):
            skipped["bad_image_row"] += 1
            continue
        if row["id"] in images:
            raise ValueError(f"captions file {path}: image id {row['id']} appears twice in 'images'")
        images[row["id"]] = row
    captions: dict[int, list[str]] = {i: [] for i in images}
    for row in data.get("annotations") or []:
        text = _clean(row.get("caption")) if isinstance(row, dict) else None
        if text is None:
            skipped["bad_annotation_row"] += 1
        elif row.get("image_id") not in captions:
            skipped["annotation_without_image"] += 1
        else:
            captions[row["image_id"]].append(text)
    records = []
    for image_id, row in images.items():
        if require_captions and not captions[image_id]:
            skipped["missing_caption"] += 1
            continue
        meta = {"image_id": image_id, "file_name": row["file_name"]}
        meta.update({k: row[k] for k in _NOCAPS_FIELDS if k in row})
        records.append(CaptionRecord(row["file_name"], captions[image_id], meta))
    if not records:
        raise ValueError(
            f"captions file {path}: no usable row ({len(data['images'])} images, "
            f"{len(data.get('annotations') or [])} annotations; skipped {dict(skipped)})"
        )
    return records


def read_karpathy(path: str | Path, split: str, *, skipped: Counter[str] | None = None) -> list[CaptionRecord]:
    """Images of Karpathy's split file whose ``split`` is ``split`` (``train+restval`` for several)."""
    skipped = Counter() if skipped is None else skipped
    wanted = [s for s in split.split("+") if s]
    if not wanted or any(s not in KARPATHY_SPLITS for s in wanted):
        raise ValueError(f"karpathy split must be one of {KARPATHY_SPLITS} (or several joined by '+'), got {split!r}")
    data = read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"Karpathy split file {path}: expected {{'images': [{{'filename', 'split', 'sentences'}}]}}")
    present: Counter[str] = Counter()
    records = []
    for row in data["images"]:
        if not isinstance(row, dict) or not isinstance(row.get("filename"), str):
            skipped["bad_image_row"] += 1
            continue
        present[str(row.get("split"))] += 1
        if row.get("split") not in wanted:
            continue
        sentences = row.get("sentences") if isinstance(row.get("sentences"), list) else []
        texts = [t for t in (_clean(s.get("raw")) if isinstance(s, dict) else None for s in sentences) if t]
        if not texts:
            skipped["missing_caption"] += 1
            continue
        image_id = row.get("cocoid", row.get("imgid"))
        if not isinstance(image_id, int):
            skipped["bad_image_row"] += 1
            continue
        file = f"{row['filepath']}/{row['filename']}" if row.get("filepath") else row["filename"]
        meta = {"image_id": image_id, "file_name": row["filename"], "split": row["split"]}
        meta.update({k: row[k] for k in ("filepath", "imgid", "cocoid") if k in row})
        records.append(CaptionRecord(file, texts, meta, key=Path(row["filename"]).stem))
    if not records:
        raise ValueError(
            f"Karpathy split file {path}: no usable row for split {split!r} "
            f"(splits in the file: {dict(present) or 'none'}; skipped {dict(skipped)})"
        )
    return records


# ----------------------------------------------------------------------------------------------
# The COCO evaluation formats


def coco_image_ids(keys: Sequence[str], meta: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Sample key -> COCO image id: the ``image_id`` every sample's json carries (COCO, Karpathy and
    NoCaps shards keep the dataset's own), else 0..n-1 in order (an annotations file written beside
    the results maps them back: its ``file_name`` is the sample key)."""
    ids = [meta.get(k, {}).get("image_id") for k in keys]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return {k: i for i, k in enumerate(keys)}
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(
            f"image ids {repeated[:5]} belong to several samples: the COCO protocol scores one caption per image "
            "against all its references; make the shards with one sample per image (pvlm-make-shards does)"
        )
    return dict(zip(keys, ids))


def coco_annotations(
    references: Mapping[str, Sequence[str]], image_ids: Mapping[str, int], description: str = ""
) -> dict[str, Any]:
    """A COCO-layout captions file (what ``pycocotools.coco.COCO`` loads) for the keys of ``image_ids``."""
    images, annotations = [], []
    for key, image_id in image_ids.items():
        images.append({"id": image_id, "file_name": key})
        for caption in references[key]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    info = {"description": description or "references of a perceiver-vlm evaluation split"}
    return {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": annotations}


def coco_results(predictions: Mapping[str, str], image_ids: Mapping[str, int]) -> list[dict[str, Any]]:
    """COCO's results format: ``[{"image_id": int, "caption": str}, ...]``, one entry per image."""
    return [{"image_id": image_ids[key], "caption": caption} for key, caption in predictions.items()]


def read_coco_results(path: str | Path) -> dict[int, str]:
    """A COCO results file -> {image_id: caption}; duplicates and malformed entries are errors."""
    rows = read_json(path, "results file")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"results file {path}: expected a non-empty list of {{'image_id': int, 'caption': str}}")
    out: dict[int, str] = {}
    for i, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("image_id"), int)
            or not isinstance(row.get("caption"), str)
        ):
            raise ValueError(f"results file {path}: entry {i} is not {{'image_id': int, 'caption': str}}: {row!r:.200}")
        if row["image_id"] in out:
            raise ValueError(
                f"results file {path}: image {row['image_id']} has two captions (COCO takes one per image)"
            )
        out[row["image_id"]] = row["caption"]
    return out


def coco_references(path: str | Path) -> dict[int, list[str]]:
    """{image_id: [caption, ...]} of a COCO-layout annotations file (every image with a caption)."""
    return {r.meta["image_id"]: r.captions for r in read_coco_captions(path)}
