"""Images and precomputed features as the VLM accepts them -> one flat (N, ...) batch in text order.

Accepted: a tensor (N, 3, H, W), (B, T, 3, H, W) or OpenFlamingo's (B, T, 1, 3, H, W), a list of PIL
images or tensors, one list per sample; features (N, P, D), (B, T, P, D) or one tensor per sample. A (B, T, ...) tensor may carry
padding slots after a sample's last image (HF processors pad to the batch's most images): when the
text gives the per-sample counts, a sample's slots past its count must be all zero and are dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .vision import FrozenTower

__all__ = ["flatten_images", "flatten_features", "flatten_pixel_mask", "media_per_sample"]


def _drop_padding(t: Tensor, per_sample: list[int] | None, what: str) -> tuple[Tensor, list[int]]:
    """(B, T, ...) -> (N, ...) of each sample's first ``per_sample[b]`` slots; the rest must be zero."""
    b, slots = t.shape[:2]
    if per_sample is None or len(per_sample) != b or all(n == slots for n in per_sample):
        return t.reshape(b * slots, *t.shape[2:]), [slots] * b
    if max(per_sample) > slots:
        row = max(range(b), key=lambda i: per_sample[i])
        raise ValueError(f"sample {row} has {per_sample[row]} images in its text but {what} has {slots} slots")
    keep = torch.arange(slots)[None, :] < torch.tensor(per_sample)[:, None]  # (B, T)
    keep = keep.to(t.device)
    padding = t[~keep]
    if padding.numel() and bool(padding.reshape(padding.shape[0], -1).any(dim=1).any()):
        raise ValueError(
            f"{what} has {slots} slots per sample, more than the text's images {per_sample}: the extra slots must "
            f"be all-zero padding (as HF processors make them), or pass one list of images per sample"
        )
    return t[keep], list(per_sample)


def flatten_images(images, tower: FrozenTower, per_sample: list[int] | None = None) -> tuple[Tensor, list[int] | None]:
    """-> (N, 3, H, W) pixels and the per-sample counts the input states (None when it states none)."""
    expected = (
        f"a float tensor {tower.expected_pixels.replace('(B,', '(N,')} or (B, T, 3, H, W), a list of PIL images, "
        f"or one list per sample"
    )
    if isinstance(images, Tensor):
        if not images.is_floating_point():
            raise ValueError(f"images must be {expected}; got a {images.dtype} tensor (preprocess it first)")
        if images.dim() == 6 and images.shape[2] == 1:  # OpenFlamingo's vision_x (B, T, F=1, 3, H, W)
            images = images[:, :, 0]
        if images.dim() == 5 and tower.accepts_pixels(images.shape[2:]):
            return _drop_padding(images, per_sample, "images")  # (N, 3, H, W)
        if images.dim() == 4 and tower.accepts_pixels(images.shape[1:]):
            return images, None
        raise ValueError(f"images must be {expected}; got shape {tuple(images.shape)}")
    if isinstance(images, (list, tuple)):
        h, w = tower.image_size
        if all(isinstance(x, (list, tuple)) for x in images):
            flat = [x for sample in images for x in sample]
            pixels = flatten_images(flat, tower)[0] if flat else torch.zeros(0, 3, h, w)
            return pixels, [len(sample) for sample in images]
        if all(isinstance(x, Tensor) for x in images):
            return flatten_images(torch.stack(images) if images else torch.zeros(0, 3, h, w), tower)[0], None
        if all(hasattr(x, "convert") and hasattr(x, "size") for x in images):  # PIL images
            return tower.preprocess_images(images), None
    raise ValueError(f"images must be {expected}; got {type(images).__name__}")


def flatten_features(features, width: int, per_sample: list[int] | None = None) -> tuple[Tensor, list[int] | None]:
    """-> (N, P, width) tower features and the per-sample counts the input states."""
    if isinstance(features, (list, tuple)):
        parts = [flatten_features(f, width)[0] for f in features]
        counts = [p.shape[0] for p in parts]
        empty = features[0].new_zeros(0, 1, width) if features else torch.zeros(0, 1, width)
        nonempty = [p for p in parts if p.shape[0]]
        return (torch.cat(nonempty) if nonempty else empty), counts
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise ValueError(
            f"image_features must be a float tensor (N, P, {width}) or (B, T, P, {width}), "
            f"got {type(features).__name__}"
        )
    if features.dim() == 2 and features.shape[0] == 0:
        return features.reshape(0, 1, width), None
    if features.dim() not in (3, 4) or features.shape[-1] != width:
        raise ValueError(
            f"image_features must be (N, P, {width}) or (B, T, P, {width}) (the vision tower's width is "
            f"{width}), got {tuple(features.shape)}"
        )
    if features.dim() == 4:
        return _drop_padding(features, per_sample, "image_features")  # (N, P, D)
    return features, None


def flatten_pixel_mask(mask: Tensor | None, pixels: Tensor, per_sample: list[int] | None) -> Tensor | None:
    """A (N, H, W) or (B, T, H, W) pixel mask (True / 1 = real pixel) -> (N, H, W) beside ``pixels``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.dim() not in (3, 4):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"pixel_attention_mask must be a boolean or integer tensor (N, H, W) or (B, T, H, W), got {got}"
        )
    if mask.dim() == 4:
        b, t = mask.shape[:2]
        counts = per_sample if per_sample is not None and len(per_sample) == b else [t] * b
        keep = (torch.arange(t)[None, :] < torch.tensor(counts)[:, None]).to(mask.device)
        mask = mask[keep]
    if tuple(mask.shape) != (pixels.shape[0], *pixels.shape[2:]):
        raise ValueError(
            f"pixel_attention_mask gives {tuple(mask.shape)} for images {tuple(pixels.shape)}: one (H, W) mask per image"
        )
    return mask.bool()


def media_per_sample(media: Tensor | None, per_sample: Tensor) -> Tensor | None:
    """(N, latents, D) flat, in text order -> (B, T_max, latents, D), zero rows for missing images."""
    if media is None:
        return None
    b, t = per_sample.shape[0], int(per_sample.max())
    out = media.new_zeros(b, t, *media.shape[1:])
    slots = torch.arange(t)[None, :] < per_sample[:, None].cpu()  # (B, T_max)
    out[slots.to(media.device)] = media
    return out
