"""A frozen open_clip image tower that returns patch tokens.

Always in eval mode, never receives gradients, and is excluded from the optimizer (its parameters
have ``requires_grad=False``; ``VisionLanguageModel.trainable_parameters`` skips it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .config import VisionConfig

__all__ = ["VisionTower", "load_open_clip"]


def load_open_clip(config: VisionConfig):
    """(open_clip model, eval preprocess) by name and ``pretrained`` tag or local weights path."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(config.name, pretrained=config.pretrained)
    return model, preprocess


class VisionTower(nn.Module):
    """open_clip model (or its ``.visual``) -> (B, P, D) patch tokens of the chosen layer.

    ``layer="last"``: tokens after the last block and the final LayerNorm (what ``output_tokens``
    gives); ``"penultimate"``: raw tokens of the block before. ``keep_cls`` prepends the class token.
    """

    def __init__(self, model: nn.Module, config: VisionConfig, preprocess: Callable | None = None) -> None:
        super().__init__()
        visual = getattr(model, "visual", model)
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(
                f"vision: expected an open_clip ViT (with .visual.forward_intermediates), got {type(visual).__name__}"
            )
        self.visual = visual
        self.config = config
        self.preprocess = preprocess
        self.width = int(visual.transformer.width)
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1]) + (1 if config.keep_cls else 0)
        self.depth = len(visual.transformer.resblocks)
        visual.requires_grad_(False)
        visual.eval()

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W), already preprocessed -> (B, P, D) patch tokens (fp32)."""
        h, w = self.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"vision: images must be a float tensor (B, 3, {h}, {w}), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"vision: images must be floating point (preprocessed), got {images.dtype}")
        param = next(self.visual.parameters())
        last = self.config.layer == "last"
        out = self.visual.forward_intermediates(
            images.to(device=param.device, dtype=param.dtype),
            indices=[self.depth - 1 if last else self.depth - 2],
            normalize_intermediates=last,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.config.keep_cls,
        )
        tokens = out["image_intermediates"][0]  # (B, P, D)
        if self.config.keep_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # (B, 1 + P, D)
        return tokens.float()

    def preprocess_images(self, images: Sequence) -> Tensor:
        """PIL images (or anything the open_clip transform takes) -> (B, 3, H, W)."""
        if self.preprocess is None:
            raise ValueError("vision: no preprocess transform was given; pass preprocessed tensors (B, 3, H, W)")
        return torch.stack([self.preprocess(image) for image in images])
