"""Frozen transformers vision towers: CLIP, SigLIP, and the towers inside IDEFICS and Idefics2.

``HFVisionTower`` wraps ``CLIPVisionModel``, ``SiglipVisionModel``, ``IdeficsVisionTransformer`` or
``Idefics2VisionTransformer`` (or a whole model holding one) under the contract of `vlm.vision`:

- ``layer="last"``: the model's ``last_hidden_state`` (CLIP and IDEFICS: the last block's output, the
  post LayerNorm applies to the pooled token only; SigLIP and Idefics2: after the post LayerNorm);
  ``"penultimate"``: the raw output of the block before the last (``hidden_states[-2]``);
- CLIP and IDEFICS prepend a class token, kept with ``keep_cls`` (IDEFICS' resampler reads it);
- Idefics2 takes images of any size (its processor keeps the aspect ratio) and a pixel mask of padded
  images (as its processor makes them), which becomes a patch mask: a patch is real when all its pixels are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .config import VisionConfig
from .vision import FrozenTower

__all__ = ["HFVisionTower", "load_hf_vision", "ImageProcessorTransform"]

_TOWERS = {  # kind -> classes of the vision transformer itself (transformers 5 merged CLIP's and SigLIP's)
    "clip": ("CLIPVisionModel", "CLIPVisionTransformer"),
    "siglip": ("SiglipVisionModel", "SiglipVisionTransformer"),
    "idefics": ("IdeficsVisionTransformer",),
    "idefics2": ("Idefics2VisionTransformer",),
}


def _tower_module(model: nn.Module, kind: str) -> nn.Module:
    """The vision transformer itself, from a tower, a ``*VisionModel`` or a whole VLM holding one."""
    inner = getattr(getattr(model, "model", None), "vision_model", None)
    for module in (model, getattr(model, "vision_model", None), inner):
        if type(module).__name__ in _TOWERS[kind]:
            return module
    raise ValueError(
        f"vision: kind={kind!r} expects a {_TOWERS[kind][0]} (or a model holding one), got {type(model).__name__}"
    )


class ImageProcessorTransform:
    """A transformers image processor as a per-image transform: PIL image -> (3, H, W) tensor.

    ``square``: resize to this square side first and skip the processor's own resize (Idefics2, whose
    processor keeps the aspect ratio, so that images of a dataset batch together).
    """

    def __init__(self, processor, square: int | None = None) -> None:
        self.processor, self.square = processor, square

    def __call__(self, image) -> Tensor:
        kwargs = {"return_tensors": "pt"}
        if self.square is not None:
            image = image.convert("RGB").resize((self.square, self.square))
            kwargs["do_resize"] = False
        pixels = self.processor(images=[image], **kwargs)
        pixels = pixels if isinstance(pixels, Tensor) else pixels["pixel_values"]  # IDEFICS' returns the tensor
        return pixels.reshape(-1, *pixels.shape[-3:])[0]  # (3, H, W): processors nest images per sample


def load_hf_vision(config: VisionConfig):
    """(tower module, PIL preprocess) from ``from_pretrained(config.name, revision=config.revision)``.

    IDEFICS and Idefics2 publish their tower inside the whole checkpoint: the whole model loads and
    its ``vision_model`` is kept.
    """
    import transformers

    classes = {
        "clip": "CLIPVisionModel",
        "siglip": "SiglipVisionModel",
        "idefics": "IdeficsForVisionText2Text",
        "idefics2": "Idefics2ForConditionalGeneration",
    }
    model = getattr(transformers, classes[config.kind]).from_pretrained(config.name, revision=config.revision)
    processor = transformers.AutoImageProcessor.from_pretrained(config.name, revision=config.revision)
    module = _tower_module(model, config.kind)
    square = module.config.image_size if config.kind == "idefics2" else None
    return module, ImageProcessorTransform(processor, square)


class HFVisionTower(FrozenTower):
    """A transformers vision transformer -> (B, P, D) patch tokens of the chosen layer (see the module doc)."""

    def __init__(self, model: nn.Module, config: VisionConfig, preprocess: Callable | None = None) -> None:
        if config.kind not in _TOWERS:
            raise ValueError(f"vision: HFVisionTower takes a transformers kind {sorted(_TOWERS)}, got {config.kind!r}")
        module = _tower_module(model, config.kind)
        super().__init__(module, config, preprocess)
        self.model = module
        cfg = module.config
        self.has_cls = config.kind in ("clip", "idefics")
        self.has_patch_mask = config.kind == "idefics2"
        self.width = int(cfg.hidden_size)
        self.patch_size = _pair(cfg.patch_size)
        self.image_size = _pair(cfg.image_size)
        grid = (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])
        self.num_patches = grid + (1 if config.keep_cls else 0)
        self.depth = int(cfg.num_hidden_layers)
        if config.layer == "penultimate" and self.depth < 2:
            raise ValueError("vision: layer='penultimate' needs a tower with at least 2 blocks")

    @property
    def expected_pixels(self) -> str:
        if self.has_patch_mask:
            return f"(B, 3, H, W) with H, W >= {self.patch_size}"
        return super().expected_pixels

    def accepts_pixels(self, shape: Sequence[int]) -> bool:
        if not self.has_patch_mask:
            return super().accepts_pixels(shape)
        c, h, w = shape
        return c == 3 and h >= self.patch_size[0] and w >= self.patch_size[1]

    def patch_mask(self, pixel_mask: Tensor) -> Tensor:
        """A patch is real when all its pixels are; rows and columns past the last whole patch are
        dropped, as the patch convolution drops them."""
        if not self.has_patch_mask:
            return super().patch_mask(pixel_mask)
        ph, pw = self.patch_size
        b, h, w = pixel_mask.shape
        rows, cols = h // ph, w // pw
        patches = pixel_mask[:, : rows * ph, : cols * pw].bool().reshape(b, rows, ph, cols, pw)
        return patches.all(dim=4).all(dim=2).reshape(b, rows * cols)  # (B, P)

    def encode(self, images: Tensor, pixel_mask: Tensor | None) -> Tensor:
        kwargs = {}
        if pixel_mask is not None:
            ph, pw = self.patch_size
            b, _, h, w = images.shape
            kwargs["patch_attention_mask"] = self.patch_mask(pixel_mask.to(images.device)).view(b, h // ph, w // pw)
        if self.config.layer == "last":
            tokens = self.model(pixel_values=images, **kwargs).last_hidden_state
        else:
            tokens = self._penultimate(images, kwargs)
        if self.has_cls and not self.config.keep_cls:
            tokens = tokens[:, 1:]  # (B, P, D) without the class token
        return tokens

    def _penultimate(self, images: Tensor, kwargs: dict) -> Tensor:
        captured = []

        def keep(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self.model.encoder.layers[-2].register_forward_hook(keep)
        try:
            self.model(pixel_values=images, **kwargs)
        finally:
            handle.remove()
        return captured[0]


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))
