"""Tiny COCO, Karpathy-split and NoCaps layouts made of real photos, for tests and for trying the
commands offline: the same file names, JSON layouts and folders as the real downloads, a dozen images.

The photos are scikit-image's bundled samples (astronaut, coffee, chelsea, rocket, camera) and
scikit-learn's (china, flower), cropped and flipped into distinct images; each comes with hand-written
captions of what the photo shows. Needs the ``dev`` extra (scikit-image, scikit-learn).

    root = write_coco_layout("tiny_coco")      # annotations/captions_val2014.json + val2014/*.jpg
    pvlm-make-shards shards.source=coco shards.annotations_file=tiny_coco/annotations/captions_val2014.json \\
        shards.input_dir=tiny_coco/val2014
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Photo", "sample_photos", "write_coco_layout", "write_karpathy_layout", "write_nocaps_layout"]

_CAPTIONS = {
    "astronaut": [
        "a woman in an orange space suit smiling at the camera",
        "an astronaut posing in front of an american flag",
        "a smiling astronaut holding a helmet",
        "portrait of a female astronaut in uniform",
        "a woman in a spacesuit with a flag behind her",
        "an astronaut in an orange suit",
        "a person wearing a space suit indoors",
        "a smiling woman dressed as an astronaut",
        "an official portrait of an astronaut",
        "a woman with short hair in a flight suit",
    ],
    "coffee": [
        "a cup of coffee on a saucer",
        "a white mug of black coffee on a table",
        "a coffee cup with a spoon on a plate",
        "a hot drink in a ceramic cup",
        "a cup of espresso on a wooden table",
        "coffee served in a white cup",
        "a saucer holding a full coffee cup",
        "a close up of a cup of coffee",
        "a drink on a red table",
        "a coffee cup seen from above",
    ],
    "chelsea": [
        "a tabby cat looking to the side",
        "an orange cat with green eyes",
        "a close up of a cat's face",
        "a striped cat sitting still",
        "a ginger cat staring at something",
        "a cat with long white whiskers",
        "the head of a brown tabby cat",
        "a cat resting on a blanket",
        "a domestic cat looking away",
        "a cute cat with pointed ears",
    ],
    "rocket": [
        "a rocket on a launch pad",
        "a space shuttle ready for launch",
        "a tall rocket standing on a launch tower",
        "a rocket under a blue sky",
        "a launch pad with a rocket and gantry",
        "a white rocket before lift off",
        "a spacecraft standing at the launch site",
        "a rocket next to its service tower",
        "a view of a rocket from the ground",
        "a rocket waiting to be launched",
    ],
    "camera": [
        "a black and white photo of a man with a camera",
        "a photographer standing on a field with a tripod",
        "a man looking through a camera on a tripod",
        "a grayscale picture of a cameraman outdoors",
        "a person taking a photograph in a park",
        "a man in a coat using an old camera",
        "an old photo of a photographer",
        "a cameraman on the grass",
        "a man behind a camera on a stand",
        "a monochrome image of a photographer",
    ],
    "china": [
        "a chinese temple behind trees",
        "a traditional pagoda roof under a blue sky",
        "an old building with a curved roof",
        "a temple surrounded by green trees",
        "a red and white building in a park",
        "a palace with a tiled roof",
        "the roof of a chinese building",
        "a historic temple on a sunny day",
        "trees in front of an old temple",
        "a pagoda seen from below",
    ],
    "flower": [
        "a pink flower with a yellow center",
        "a close up of a blooming flower",
        "a bee on a pink flower",
        "a flower with many petals",
        "a dahlia in full bloom",
        "a bright flower in a garden",
        "petals of a pink flower",
        "a macro photo of a flower",
        "a flower seen from above",
        "a pink blossom with green leaves",
    ],
}


@dataclass
class Photo:
    """One distinct image (a crop of a sample photo, maybe flipped) and what it shows."""

    name: str
    jpeg: bytes
    captions: list[str]


@lru_cache(maxsize=1)
def _bases() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    bases = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")}
    china, flower = load_sample_images().images
    bases.update(china=china, flower=flower)
    return {k: np.stack([v] * 3, axis=-1) if v.ndim == 2 else v[..., :3] for k, v in bases.items()}


def sample_photos(n: int = 14, size: int = 64, seed: int = 0) -> list[Photo]:
    """``n`` distinct real photos as JPEG bytes (``size`` px): each base photo cropped at a random
    window (60-95% of its side) and flipped on every second pass."""
    rng = np.random.default_rng(seed)
    bases = _bases()
    names = list(bases)
    photos = []
    for i in range(n):
        base = names[i % len(names)]
        pixels = bases[base]
        h, w = pixels.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 0.95))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = pixels[top : top + side, left : left + side]
        if (i // len(names)) % 2:
            crop = crop[:, ::-1]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        photos.append(Photo(f"{base}{i}", buffer.getvalue(), list(_CAPTIONS[base])))
    return photos


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def write_coco_layout(root: str | Path, n: int = 12, captions_per_image: int = 5, split: str = "val2014") -> Path:
    """``root/annotations/captions_<split>.json`` + ``root/<split>/COCO_<split>_<id:012d>.jpg``, COCO's
    layout; image ids are not in file order and one annotation has an extra trailing newline, as in COCO."""
    root = Path(root)
    images, annotations = [], []
    for i, photo in enumerate(sample_photos(n)):
        image_id = 391895 + 7919 * i
        file_name = f"COCO_{split}_{image_id:012d}.jpg"
        _write(root / split / file_name, photo.jpeg)
        images.append({"id": image_id, "file_name": file_name, "height": 64, "width": 64, "license": 1})
        for caption in photo.captions[:captions_per_image]:
            annotations.append({"id": 100 + len(annotations), "image_id": image_id, "caption": caption})
    annotations[0]["caption"] += " \n"
    annotations.reverse()  # annotations are not grouped by image in COCO's files
    data = {"info": {"description": "tiny COCO"}, "licenses": [], "images": images, "annotations": annotations}
    _write(root / "annotations" / f"captions_{split}.json", json.dumps(data))
    return root


def write_karpathy_layout(root: str | Path, n: int = 12, captions_per_image: int = 5) -> Path:
    """A COCO 2014 download with Karpathy's split file: ``root/dataset_coco.json``, ``root/train2014/``,
    ``root/val2014/`` and ``root/annotations/captions_{train,val}2014.json`` (the same images, ids and
    captions). Splits cycle through train, restval, val, test (train under train2014, the others under
    val2014, as in the real split: restval, val and test are all COCO val2014 images)."""
    root = Path(root)
    rows = []
    coco: dict[str, dict[str, list]] = {f: {"images": [], "annotations": []} for f in ("train2014", "val2014")}
    for i, photo in enumerate(sample_photos(n, seed=1)):
        split = ("train", "restval", "val", "test")[i % 4]
        folder = "train2014" if split == "train" else "val2014"
        cocoid = 9000 + 13 * i
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        _write(root / folder / filename, photo.jpeg)
        sentences = [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 5 * i + j}
                     for j, c in enumerate(photo.captions[:captions_per_image])]  # fmt: skip
        rows.append({"filepath": folder, "filename": filename, "imgid": i, "split": split, "cocoid": cocoid,
                     "sentids": [s["sentid"] for s in sentences], "sentences": sentences})  # fmt: skip
        coco[folder]["images"].append({"id": cocoid, "file_name": filename, "height": 64, "width": 64})
        coco[folder]["annotations"] += [{"id": s["sentid"], "image_id": cocoid, "caption": s["raw"]} for s in sentences]
    _write(root / "dataset_coco.json", json.dumps({"images": rows, "dataset": "coco"}))
    for folder, data in coco.items():
        _write(root / "annotations" / f"captions_{folder}.json", json.dumps({"info": {}, "licenses": [], **data}))
    return root


def write_nocaps_layout(root: str | Path, n: int = 9, captions_per_image: int = 10) -> Path:
    """``root/nocaps_val_4500_captions.json`` + ``root/validation/<open_images_id>.jpg`` (domains in-, near-
    and out-domain, 10 captions each) and ``root/nocaps_test_image_info.json`` + ``root/test/`` (no captions)."""
    root = Path(root)
    photos = sample_photos(n + 3, seed=2)
    domains = ("in-domain", "near-domain", "out-domain")
    for split, chosen, folder in (("val", photos[:n], "validation"), ("test", photos[n:], "test")):
        images, annotations = [], []
        for i, photo in enumerate(chosen):
            open_images_id = f"{0x0013EA2087020901 + 977 * i:016x}"
            file_name = f"{open_images_id}.jpg"
            _write(root / folder / file_name, photo.jpeg)
            images.append({"id": i, "file_name": file_name, "open_images_id": open_images_id,
                           "domain": domains[i % 3], "height": 64, "width": 64})  # fmt: skip
            for caption in photo.captions[:captions_per_image]:
                annotations.append({"image_id": i, "id": len(annotations), "caption": caption})
        data: dict = {"licenses": [], "info": {"description": f"tiny nocaps {split}"}, "images": images}
        if split == "val":
            data["annotations"] = annotations
        name = "nocaps_val_4500_captions.json" if split == "val" else "nocaps_test_image_info.json"
        _write(root / name, json.dumps(data))
    return root
