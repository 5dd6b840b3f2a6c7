"""Frozen image towers that return patch tokens: the contract, and open_clip's (transformers towers:
`vlm.hf_vision`; choosing one by ``config.vision.kind``: `vlm.towers`).

Every tower keeps one contract: always in eval mode, never receives gradients, excluded from the
optimizer (its parameters have ``requires_grad=False``), ``forward(images (B, 3, H, W)) -> (B, P, D)``
fp32 tokens of the configured ``layer``, and ``width``, ``num_patches``, ``image_size``, ``depth``,
``preprocess`` (PIL image -> (3, H, W)). ``config.vision`` (a `VisionConfig`) names the tower whole:
`vlm.towers.load_vision_tower` rebuilds it from those fields alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .config import VisionConfig

__all__ = ["FrozenTower", "VisionTower", "load_open_clip"]


class FrozenTower(nn.Module):
    """What every tower shares: frozen weights, eval mode, input checks and PIL preprocessing.

    Subclasses set ``width``, ``image_size``, ``num_patches``, ``depth`` and implement ``encode``.
    ``has_patch_mask``: the tower takes a pixel mask of padded images (Idefics2).
    """

    has_patch_mask = False

    def __init__(self, module: nn.Module, config: VisionConfig, preprocess: Callable | None) -> None:
        super().__init__()
        self.config = config
        self.preprocess = preprocess
        module.requires_grad_(False)
        module.eval()

    def train(self, mode: bool = True) -> FrozenTower:
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    @property
    def expected_pixels(self) -> str:
        h, w = self.image_size
        return f"(B, 3, {h}, {w})"

    def accepts_pixels(self, shape: Sequence[int]) -> bool:
        """Whether (3, H, W) is an image size this tower takes (the fixed ``image_size`` by default)."""
        return tuple(shape) == (3, *self.image_size)

    @torch.no_grad()
    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        """images (B, 3, H, W), already preprocessed -> (B, P, D) patch tokens (fp32). ``pixel_mask``
        (B, H, W), True = real pixel: only for towers with ``has_patch_mask``."""
        if not isinstance(images, Tensor) or images.dim() != 4 or not self.accepts_pixels(images.shape[1:]):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"vision: images must be a float tensor {self.expected_pixels}, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"vision: images must be floating point (preprocessed), got {images.dtype}")
        if pixel_mask is not None:
            self._check_pixel_mask(images, pixel_mask)
        param = next(self.parameters())
        return self.encode(images.to(device=param.device, dtype=param.dtype), pixel_mask).float()

    def encode(self, images: Tensor, pixel_mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def patch_mask(self, pixel_mask: Tensor) -> Tensor:
        """(B, H, W) pixel mask -> (B, P) patch mask, True = a patch of real pixels only."""
        raise ValueError(f"vision: a {self.config.kind!r} tower takes no pixel mask")

    def _check_pixel_mask(self, images: Tensor, pixel_mask: Tensor) -> None:
        if not self.has_patch_mask:
            raise ValueError(f"vision: a {self.config.kind!r} tower takes no pixel mask")
        want = (images.shape[0], *images.shape[2:])
        if not isinstance(pixel_mask, Tensor) or tuple(pixel_mask.shape) != want or pixel_mask.is_floating_point():
            got = tuple(pixel_mask.shape) if isinstance(pixel_mask, Tensor) else type(pixel_mask).__name__
            raise ValueError(f"vision: pixel_mask must be a boolean or integer tensor {want} (B, H, W), got {got}")

    def preprocess_images(self, images: Sequence) -> Tensor:
        """PIL images (or anything the tower's transform takes) -> (B, 3, H, W)."""
        if self.preprocess is None:
            raise ValueError("vision: no preprocess transform was given; pass preprocessed tensors (B, 3, H, W)")
        return torch.stack([self.preprocess(image) for image in images])


def load_open_clip(config: VisionConfig):
    """(open_clip model, eval preprocess) by name and ``pretrained`` tag or local weights path."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(config.name, pretrained=config.pretrained)
    return model, preprocess


class VisionTower(FrozenTower):
    """open_clip model (or its ``.visual``) -> (B, P, D) patch tokens of the chosen layer.

    ``layer="last"``: tokens after the last block and the final LayerNorm (what ``output_tokens``
    gives); ``"penultimate"``: raw tokens of the block before. ``keep_cls`` prepends the class token.
    """

    def __init__(self, model: nn.Module, config: VisionConfig, preprocess: Callable | None = None) -> None:
        visual = getattr(model, "visual", model)
        if config.kind != "open_clip":
            raise ValueError(f"vision: VisionTower is the open_clip tower; vision.kind is {config.kind!r}")
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(
                f"vision: expected an open_clip ViT (with .visual.forward_intermediates), got {type(visual).__name__}"
            )
        super().__init__(visual, config, preprocess)
        self.visual = visual
        self.width = int(visual.transformer.width)
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1]) + (1 if config.keep_cls else 0)
        self.depth = len(visual.transformer.resblocks)

    def encode(self, images: Tensor, pixel_mask: Tensor | None) -> Tensor:
        last = self.config.layer == "last"
        out = self.visual.forward_intermediates(
            images,
            indices=[self.depth - 1 if last else self.depth - 2],
            normalize_intermediates=last,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.config.keep_cls,
        )
        tokens = out["image_intermediates"][0]  # (B, P, D)
        if self.config.keep_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # (B, 1 + P, D)
        return tokens
