"""Decoding one stored sample: image bytes -> RGB PIL image, captions JSON/text, cached feature arrays.

Everything that can be wrong with a sample raises `BadSample` with a reason (the reader's skip
counter key); images in other modes (grayscale, RGBA, palette, CMYK, 16-bit) are converted to RGB.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .config import DataConfig

__all__ = ["BadSample", "FEATURES_EXT", "build_transform", "decode_image", "read_captions", "read_features"]

FEATURES_EXT = "features.npy"  # the tar member holding a sample's cached (P, D) features


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def build_transform(config: DataConfig) -> Callable[[Image.Image], Tensor]:
    """open_clip's eval preprocess at ``config.image_size`` (or a plain resize + [0, 1] tensor)."""
    if config.preprocess == "open_clip":
        import open_clip

        return open_clip.image_transform(
            config.image_size, is_train=False, mean=config.image_mean, std=config.image_std
        )
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((config.image_size, config.image_size)), transforms.ToTensor()])


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> RGB; returns the original mode when a conversion happened."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0  # 16-bit range -> 8 bits (a plain convert would clip at 255)
        gray = np.clip(pixels * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1)), mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent pixels become white
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas, mode
    return image.convert("RGB"), mode


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str | None]:
    """Encoded image bytes -> (RGB PIL image, original mode if converted). Raises `BadSample`."""
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadSample("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
            image.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as err:
        raise BadSample("decompression_bomb", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
        raise BadSample(reason, str(err)) from None
    return _to_rgb(image)


def read_captions(sample: dict[str, Any], allow_empty: bool = False) -> tuple[list[str], dict[str, Any]]:
    """Captions (``json`` ``captions``/``caption``, else ``txt`` lines) and the JSON metadata.

    ``allow_empty`` accepts a sample whose captions are empty (an image kept for prediction only, like
    NoCaps test); a sample with neither ``json`` nor ``txt`` is still ``missing_caption``."""
    meta: dict[str, Any] = {}
    captions: list[str] = []
    try:
        if "json" in sample:
            meta = json.loads(sample["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise BadSample("bad_json", "the json member must hold an object")
            found = meta.get("captions", meta.get("caption"))
            captions = [found] if isinstance(found, str) else list(found or [])
        if not captions and "txt" in sample:
            captions = sample["txt"].decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BadSample("bad_caption_encoding", str(err)) from None
    except json.JSONDecodeError as err:
        raise BadSample("bad_json", str(err)) from None
    if "json" not in sample and "txt" not in sample:
        raise BadSample("missing_caption")
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions and not allow_empty:
        raise BadSample("empty_caption")
    return captions, meta


def read_features(data: bytes, float32: bool = True) -> Tensor:
    """``.npy`` bytes of one sample's (P, D) features -> fp32 tensor (``float32=False``: the stored
    dtype). Raises `BadSample`."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadSample("corrupt_features", str(err)) from None
    if array.ndim != 2:
        raise BadSample("corrupt_features", f"expected (P, D) features, got shape {array.shape}")
    return torch.from_numpy(array.astype(np.float32) if float32 else array)
