"""Typed configs of a vision-language model, one dataclass per part; YAML mirrors them 1:1.

Widths that depend on the loaded parts (the tower's feature width, the LM's hidden size) are not
config fields: they are read from the models when the VLM is built and checked there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import resampler

__all__ = [
    "VisionConfig",
    "ResamplerConfig",
    "ProjectorConfig",
    "LMConfig",
    "LoRAConfig",
    "InjectionConfig",
    "VLMConfig",
]


def _positive(owner: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


@dataclass
class VisionConfig:
    """An open_clip image tower, frozen.

    ``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``), a local checkpoint
    path, or None for random weights. ``layer`` picks the patch tokens of the last block (after the
    final LayerNorm) or of the penultimate block (raw, as LLaVA does).
    """

    name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    layer: Literal["last", "penultimate"] = "last"
    keep_cls: bool = False


@dataclass
class ResamplerConfig(resampler.ResamplerConfig):
    """The Perceiver Resampler (`resampler.ResamplerConfig`: its fields), run at the tower's width.

    ``dim`` is left None: the VLM sets it to the vision tower's width. ``trainable=False`` keeps a
    plugged-in trained resampler fixed (only the projection head and LoRA train).
    """

    trainable: bool = True


@dataclass
class ProjectorConfig:
    """Resampler width -> LM hidden size: one linear layer or a 2-layer GELU MLP."""

    kind: Literal["linear", "mlp"] = "mlp"
    hidden_dim: int | None = None  # MLP hidden width; None = the LM's hidden size

    def __post_init__(self) -> None:
        _positive("projector", hidden_dim=self.hidden_dim)


@dataclass
class LMConfig:
    """A Hugging Face causal LM by hub id or local directory.

    ``quantization`` loads the LM's linear layers with bitsandbytes (4-bit nf4/fp4 with optional
    double quantization, or 8-bit); the vision connector is never quantized.
    """

    name_or_path: str = "HuggingFaceTB/SmolLM2-135M"
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_double_quant: bool = True
    # dtype the packed 4-bit weights are stored in; set it to ``dtype`` under train.distributed=fsdp
    # (bitsandbytes' FSDP-QLoRA guide: the packed weights then share the dtype of the rest of their unit)
    bnb_4bit_quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class LoRAConfig:
    """peft LoRA on the LM. ``target_modules`` None = the registry's targets for the LM family;
    ``["all-linear"]`` = every linear layer but the output head."""

    enabled: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        _positive("lora", r=self.r, alpha=self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules must be None (registry) or a non-empty list of module names")


@dataclass
class InjectionConfig:
    """How image tokens reach the LM.

    ``prefix``: each ``<image>`` in the text becomes ``num_latents`` placeholder tokens whose input
    embeddings are replaced by the projected resampler outputs.
    ``cross_attention``: Flamingo gated cross-attention before every ``every_k_layers``-th decoder
    layer (tanh gates start at 0); each ``<image>`` stays one token marking where the image is.
    """

    mode: Literal["prefix", "cross_attention"] = "prefix"
    image_token: str = "<image>"
    every_k_layers: int = 4
    xattn_heads: int = 8
    xattn_head_dim: int = 64
    xattn_ff_mult: float = 4.0

    def __post_init__(self) -> None:
        _positive(
            "injection",
            every_k_layers=self.every_k_layers,
            xattn_heads=self.xattn_heads,
            xattn_head_dim=self.xattn_head_dim,
            xattn_ff_mult=self.xattn_ff_mult,
        )
        if not self.image_token or self.image_token.strip() != self.image_token:
            raise ValueError(
                f"injection.image_token must be a non-empty string without outer spaces, got {self.image_token!r}"
            )


@dataclass
class VLMConfig:
    """The whole vision-language model: ``vision -> resampler -> projector -> lm`` (+ lora, injection)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    caption_prompt: str = ""  # text after the image when captioning, e.g. "Caption:"
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        _positive("vlm", max_new_tokens=self.max_new_tokens)

    @property
    def tokens_per_image(self) -> int:
        """Derived: text tokens one image occupies (a property, so it follows later edits of the parts)."""
        return self.resampler.num_latents if self.injection.mode == "prefix" else 1
