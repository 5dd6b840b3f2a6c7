"""A deterministic synthetic captioning world: 1-3 coloured shapes, several reference captions each.

Every image is a function of ``(config.seed, split, index)`` alone, so any sample can be regenerated
without the shards. Objects sit in distinct cells of a plus-shaped layout (left, right, top, bottom,
center) so position words are unambiguous. Captions use a fixed, parseable order
``<size> <colour> <shape> <position phrase>``, objects listed left -> top -> center -> bottom -> right,
with a few paraphrases around that core. ``parse_caption`` inverts it (used by the evaluation).

Splits: ``train`` never contains a ``config.holdout`` colour/shape pair; ``val`` and ``test`` are new
images of the same (seen) combinations; ``compositional`` has at least one held-out pair per image.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .shards import ShardSummary, write_samples

__all__ = [
    "SyntheticConfig",
    "COLOUR_RGB",
    "POSITIONS",
    "POSITION_PHRASES",
    "SPLITS",
    "SHAPES",
    "SceneObject",
    "Scene",
    "generate_scene",
    "render_scene",
    "scene_captions",
    "parse_caption",
    "caption_vocabulary",
    "write_synthetic_shards",
]

SPLITS = ("train", "val", "test", "compositional")
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOUR_RGB = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 215, 30),
    "purple": (165, 55, 210),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
    "cyan": (30, 210, 215),
}
# Cell centres as (x, y) fractions of the image side: a plus shape, so up to five objects never overlap.
POSITIONS = {
    "left": (1 / 6, 1 / 2),
    "top": (1 / 2, 1 / 6),
    "center": (1 / 2, 1 / 2),
    "bottom": (1 / 2, 5 / 6),
    "right": (5 / 6, 1 / 2),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_BACKGROUND = (28, 28, 32)
_SUPERSAMPLE = 4


@dataclass
class SyntheticConfig:
    """The synthetic captioning world: 1-3 coloured shapes on a plain background, several captions each.

    ``holdout`` lists ``colour/shape`` pairs that never appear in the training split; the
    ``compositional`` split has at least one of them in every image.
    """

    image_size: int = 64
    seed: int = 0
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    sizes: tuple[str, ...] = ("small", "large")
    size_fractions: tuple[float, ...] = (0.18, 0.28)  # object extent as a fraction of the image side
    object_count_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)  # P(1 object), P(2), P(3)
    holdout: tuple[str, ...] = ("red/triangle", "green/cross", "blue/square", "yellow/circle")
    captions_per_image: int = 5
    jitter: float = 0.02  # random shift of each object, fraction of the image side
    noise: float = 6.0  # std of the background pixel noise (0-255 scale)
    split_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 6000, "val": 200, "test": 400, "compositional": 200}
    )
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.size_fractions):
            raise ValueError(
                f"SyntheticConfig.size_fractions needs one entry per size {list(self.sizes)}, "
                f"got {list(self.size_fractions)}"
            )
        if any(w < 0 for w in self.object_count_weights) or sum(self.object_count_weights) <= 0:
            raise ValueError(f"SyntheticConfig.object_count_weights must be >= 0, got {self.object_count_weights}")
        unknown_shapes = set(self.shapes) - set(SHAPES)
        unknown_colours = set(self.colours) - set(COLOUR_RGB)
        if unknown_shapes or unknown_colours or len(set(self.shapes)) < len(self.shapes):
            raise ValueError(
                f"SyntheticConfig.shapes must be distinct names from {list(SHAPES)} and colours from "
                f"{list(COLOUR_RGB)}; unknown: {sorted(unknown_shapes | unknown_colours)}"
            )
        for pair in self.holdout:
            colour, _, shape = pair.partition("/")
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(
                    f"SyntheticConfig.holdout entry {pair!r} must be 'colour/shape' with colour in "
                    f"{list(self.colours)} and shape in {list(self.shapes)}"
                )
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        if self.captions_per_image < 1 or self.samples_per_shard < 1:
            raise ValueError("SyntheticConfig.captions_per_image and samples_per_shard must be >= 1")
        empty = [k for k, n in self.split_sizes.items() if n < 1]
        if empty:
            raise ValueError(f"SyntheticConfig.split_sizes must be >= 1 (leave a split out to skip it); got {empty}")
        unknown = set(self.split_sizes) - {"train", "val", "test", "compositional"}
        if unknown:
            raise ValueError(
                f"SyntheticConfig.split_sizes keys must be train/val/test/compositional, got {sorted(unknown)}"
            )

    @property
    def holdout_pairs(self) -> set[tuple[str, str]]:
        return {tuple(p.split("/", 1)) for p in self.holdout}  # type: ignore[misc]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    x: float  # centre, fraction of the image side
    y: float

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass
class Scene:
    key: str
    split: str
    objects: list[SceneObject]
    captions: list[str]
    image: Image.Image

    def metadata(self) -> dict:
        """The JSON stored next to the image: captions plus per-object ground truth."""
        return {
            "captions": self.captions,
            "split": self.split,
            "num_objects": len(self.objects),
            "objects": [asdict(o) for o in self.objects],
        }


def _rng(config: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([config.seed, SPLITS.index(split), index])


def _sample_objects(config: SyntheticConfig, split: str, rng: np.random.Generator) -> list[SceneObject]:
    weights = np.asarray(config.object_count_weights, dtype=float)
    count = int(rng.choice(np.arange(1, 4), p=weights / weights.sum()))
    held = config.holdout_pairs
    pairs = [(c, s) for c in config.colours for s in config.shapes]
    seen = [p for p in pairs if p not in held]
    unseen = [p for p in pairs if p in held]
    if split == "compositional" and not unseen:
        raise ValueError("the compositional split needs SyntheticConfig.holdout to name at least one colour/shape")
    cells = [str(c) for c in rng.permutation(list(POSITIONS))[:count]]
    objects = []
    for i, cell in enumerate(cells):
        pool = unseen if (split == "compositional" and i == 0) else (seen if split != "compositional" else pairs)
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = config.sizes[int(rng.integers(len(config.sizes)))]
        cx, cy = POSITIONS[cell]
        dx, dy = rng.uniform(-config.jitter, config.jitter, size=2)
        objects.append(SceneObject(shape, colour, size, cell, float(cx + dx), float(cy + dy)))
    order = list(POSITIONS)
    return sorted(objects, key=lambda o: order.index(o.position))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        t = r / 3
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render_scene(objects: list[SceneObject], config: SyntheticConfig, rng: np.random.Generator) -> Image.Image:
    """Draw the objects (supersampled, then downsized for smooth edges) on a slightly noisy background."""
    side = config.image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        if obj.colour not in COLOUR_RGB:
            raise ValueError(f"unknown colour {obj.colour!r}; known: {sorted(COLOUR_RGB)}")
        shade = np.clip(np.asarray(COLOUR_RGB[obj.colour]) + rng.integers(-12, 13, size=3), 0, 255)
        fill = tuple(int(v) for v in shade)
        r = config.size_fractions[config.sizes.index(obj.size)] * side / 2
        cx, cy = obj.x * side, obj.y * side
        points = _shape_points(obj.shape, cx, cy, r)
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif points is not None:
            draw.polygon(points, fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {list(SHAPES)}")
    image = canvas.resize((config.image_size, config.image_size), Image.BOX)  # area average of the supersampled canvas
    if config.noise > 0:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, config.noise, size=(*image.size[::-1], 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return image


def scene_captions(objects: list[SceneObject], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` reference captions; the first is canonical, the rest are paraphrases of it."""
    phrases = [o.phrase() for o in objects]

    def listing(items: list[str]) -> str:
        items = [f"a {p}" for p in items]
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    n = len(objects)
    canonical = listing(phrases)
    if n == 1:
        variants = [
            f"there is {canonical}",
            f"one {phrases[0]}",
            f"a picture of {canonical}",
            f"an image with {canonical}",
        ]
    else:
        word = _NUMBER_WORDS[n]
        variants = [
            f"{word} shapes: {canonical}",
            f"there are {word} shapes: {canonical}",
            f"a picture of {listing(phrases[::-1])}",
            f"{listing(phrases[::-1])}",
        ]
    order = rng.permutation(len(variants))
    captions = [canonical] + [variants[i] for i in order]
    while len(captions) < count:
        captions += captions[1:] or captions
    return [c + "." for c in captions[:count]]


def generate_scene(config: SyntheticConfig, split: str, index: int) -> Scene:
    """Sample ``index`` of ``split``: the same objects, image and captions every time."""
    rng = _rng(config, split, index)
    objects = _sample_objects(config, split, rng)
    image = render_scene(objects, config, rng)
    captions = scene_captions(objects, config.captions_per_image, rng)
    return Scene(f"{split}-{index:07d}", split, objects, captions, image)


def caption_vocabulary(config: SyntheticConfig) -> list[str]:
    """Every word a caption of this world can use (e.g. to train a tiny tokenizer or LM)."""
    words = {"a", "and", "there", "is", "are", "one", "two", "three", "shapes", "picture", "of", "an", "image", "with"}
    words |= set(config.shapes) | set(config.colours) | set(config.sizes)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


_WORD = re.compile(r"[a-z]+")


def parse_caption(caption: str, config: SyntheticConfig) -> list[dict[str, str | None]]:
    """Objects named in a caption, as ``{"shape", "colour", "size", "position"}`` (None when missing).

    A shape word closes an object: size/colour words since the previous object belong to it, and the
    first position word after it is its position. Colour/size words with no shape following become an
    object with ``shape=None``.
    """
    objects: list[dict[str, str | None]] = []
    pending: dict[str, str | None] = {}
    position_words = set(POSITIONS)
    for word in _WORD.findall(caption.lower()):
        if word in config.colours:
            pending["colour"] = word
        elif word in config.sizes:
            pending["size"] = word
        elif word in config.shapes:
            objects.append(
                {"shape": word, "colour": pending.get("colour"), "size": pending.get("size"), "position": None}
            )
            pending = {}
        elif word in position_words:
            if pending:
                objects.append(
                    {"shape": None, "colour": pending.get("colour"), "size": pending.get("size"), "position": None}
                )
                pending = {}
            if objects and objects[-1]["position"] is None:
                objects[-1]["position"] = word
    if pending:
        objects.append({"shape": None, "colour": pending.get("colour"), "size": pending.get("size"), "position": None})
    return objects


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded_sample(args: tuple[SyntheticConfig, str, int]) -> dict:
    config, split, index = args
    scene = generate_scene(config, split, index)
    return {"__key__": scene.key, "png": _encode_png(scene.image), "json": scene.metadata()}


def write_synthetic_shards(
    config: SyntheticConfig, out_dir: str | Path, splits: dict[str, int] | None = None, workers: int | None = None
) -> dict[str, ShardSummary]:
    """Write ``{split}-NNNNNN.tar`` shards (``.png`` + ``.json``) for each split; returns their summaries.

    ``splits`` overrides ``config.split_sizes`` (split name -> number of images). ``workers`` processes
    render the images (default: up to 2 for large splits); the shards are identical either way.
    """
    sizes = config.split_sizes if splits is None else splits
    summaries = {}
    for split, count in sizes.items():
        jobs = ((config, split, index) for index in range(count))
        n = workers if workers is not None else (min(2, os.cpu_count() or 1) if count >= 1000 else 1)
        if n > 1:
            with multiprocessing.get_context("fork").Pool(n) as pool:
                samples = pool.imap(_encoded_sample, jobs, chunksize=64)
                summaries[split] = write_samples(
                    samples, out_dir, prefix=split, samples_per_shard=config.samples_per_shard
                )
        else:
            samples = map(_encoded_sample, jobs)
            summaries[split] = write_samples(samples, out_dir, prefix=split, samples_per_shard=config.samples_per_shard)
    return summaries
