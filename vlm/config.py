"""Typed configs of a vision-language model, one dataclass per part; YAML mirrors them 1:1.

Widths that depend on the loaded parts (the tower's feature width, the LM's hidden size) are not
config fields: they are read from the models when the VLM is built and checked there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import resampler
from resampler import AttentionSpec, FeedForwardSpec, NormSpec
from resampler.nn.blocks import ACTIVATIONS

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
        if value is None:
            continue
        if isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


TRANSFORMERS_TOWERS = ("clip", "siglip", "idefics", "idefics2")


@dataclass
class VisionConfig:
    """A frozen image tower: open_clip, or a transformers vision model.

    ``kind``: ``open_clip`` (``name`` an open_clip model name, ``pretrained`` an open_clip tag such as
    ``"openai"``, a local checkpoint path, or None for random weights), or a transformers tower loaded
    with ``from_pretrained(name, revision=revision)``: ``clip`` (``CLIPVisionModel``), ``siglip``
    (``SiglipVisionModel``), ``idefics`` (the ``IdeficsVisionTransformer`` inside an IDEFICS checkpoint)
    or ``idefics2`` (its ``Idefics2VisionTransformer``, with a patch mask). For these ``pretrained`` is
    not used (stored as None). ``layer``: the tower's last layer (open_clip: after its final LayerNorm;
    transformers: the model's ``last_hidden_state``, which for CLIP and IDEFICS is before the post
    LayerNorm) or the raw output of the penultimate block (as LLaVA). ``keep_cls`` keeps the class token
    (towers that have one: open_clip, clip, idefics). These fields are the tower's whole identity: the
    feature cache and the adapter manifest record them.
    """

    kind: Literal["open_clip", "clip", "siglip", "idefics", "idefics2"] = "open_clip"
    name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    revision: str | None = None
    layer: Literal["last", "penultimate"] = "last"
    keep_cls: bool = False

    def __post_init__(self) -> None:
        if self.kind == "open_clip":
            if self.revision is not None:
                raise ValueError("vision.revision is for transformers towers; open_clip takes vision.pretrained")
            return
        if self.kind not in TRANSFORMERS_TOWERS:
            raise ValueError(
                f"vision.kind must be 'open_clip' or one of {list(TRANSFORMERS_TOWERS)}, got {self.kind!r}"
            )
        if self.pretrained == "openai":  # the open_clip default, left in place: not an instruction
            self.pretrained = None
        if self.pretrained is not None:
            raise ValueError(
                f"vision.pretrained={self.pretrained!r} is an open_clip weights tag; a {self.kind!r} tower loads its "
                f"weights from vision.name (a hub id or a local directory)"
            )
        if self.keep_cls and self.kind in ("siglip", "idefics2"):
            raise ValueError(f"vision.keep_cls: a {self.kind!r} tower has no class token")


@dataclass
class ResamplerConfig(resampler.ResamplerConfig):
    """The Perceiver Resampler (`resampler.ResamplerConfig`: its fields), run at the tower's width.

    ``dim`` is left None: the VLM sets it to the vision tower's width. ``trainable=False`` keeps a
    plugged-in trained resampler fixed (only the projection head and LoRA train).
    """

    trainable: bool = True


@dataclass
class ProjectorConfig:
    """The head between the resampler and the LM.

    ``kind``: ``linear``; ``mlp`` (Linear -> GELU -> Linear); ``swiglu`` (``down(act(gate(x)) * up(x))``
    without biases, Idefics2's modality projection; ``activation`` is its gate's); ``none`` (identity: the
    media go to the LM at the width they have, as in OpenFlamingo and IDEFICS, whose cross-attention takes
    the resampler's output at the vision width). ``hidden_dim``: MLP / SwiGLU width (None: the LM's
    hidden size). ``order``: ``resample_then_project`` (the resampler at the vision width, the head after
    it) or ``project_then_resample`` (Idefics2: the head maps the tower's tokens to the LM width first,
    the resampler runs at the LM width).
    """

    kind: Literal["linear", "mlp", "swiglu", "none"] = "mlp"
    hidden_dim: int | None = None
    activation: str = "silu"
    order: Literal["resample_then_project", "project_then_resample"] = "resample_then_project"

    def __post_init__(self) -> None:
        _positive("projector", hidden_dim=self.hidden_dim)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"projector.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.order == "project_then_resample" and self.kind == "none":
            raise ValueError("projector.order='project_then_resample' needs a projector: kind must not be 'none'")


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
    ``cross_attention``: Flamingo gated cross-attention blocks run before some decoder layers: the first
    of every ``every_k_layers`` (``xattn_layers="first"``: layers i with i % k == 0, IDEFICS) or the last
    (``"last"``: (i + 1) % k == 0, OpenFlamingo); each ``<image>`` stays one token marking where the
    image is. A block is ``y += tanh(a) * XAttn(norm(y), media)``, ``y += tanh(b) * FF(norm(y))`` with
    gates at 0 (the model starts as the base LM exactly):

    - ``xattn_norm`` / ``xattn_norm_eps``: LayerNorm (OpenFlamingo) or RMSNorm (IDEFICS) on the text;
    - ``xattn_heads``, ``xattn_head_dim``, ``xattn_qk_norm`` (per-head norm of q and k, IDEFICS
      ``qk_layer_norms``), ``xattn_qkv_bias``, ``xattn_out_bias``;
    - the MLP: ``xattn_ff_mult`` or ``xattn_ff_hidden_dim``, ``xattn_ff_activation``, ``xattn_ff_gated``
      (SwiGLU with 'silu'), ``xattn_ff_bias``;
    - ``xattn_gate``: one scalar per gate (OpenFlamingo) or one per channel (IDEFICS ``alpha_type="vector"``);
    - ``xattn_ff_scope``: the FF branch updates every token (``"all"``, as OpenFlamingo and IDEFICS do) or
      only tokens at or after an image (``"after_image"``: text before the first image and text-only
      samples stay exactly the base LM's);
    - each token attends to the latest ``<image>`` at or before it; ``xattn_reset_after_eos``: and to none
      after an eos token until the next image (IDEFICS' ``image_attention_mask``);
    - ``decoder_layers``: dotted path of the LM's decoder-layer list (None: `vlm.registry`).
    """

    mode: Literal["prefix", "cross_attention"] = "prefix"
    image_token: str = "<image>"
    every_k_layers: int = 4
    xattn_layers: Literal["first", "last"] = "first"
    xattn_heads: int = 8
    xattn_head_dim: int = 64
    xattn_ff_mult: float = 4.0
    xattn_ff_hidden_dim: int | None = None
    xattn_ff_activation: str = "gelu"
    xattn_ff_gated: bool = False
    xattn_ff_bias: bool = True
    xattn_norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    xattn_norm_eps: float | None = None
    xattn_qk_norm: Literal["layernorm", "rmsnorm"] | None = None
    xattn_qk_norm_eps: float | None = None
    xattn_qkv_bias: bool = False
    xattn_out_bias: bool = True
    xattn_gate: Literal["scalar", "vector"] = "scalar"
    xattn_ff_scope: Literal["all", "after_image"] = "all"
    xattn_reset_after_eos: bool = False
    decoder_layers: str | None = None

    def __post_init__(self) -> None:
        _positive(
            "injection",
            every_k_layers=self.every_k_layers,
            xattn_heads=self.xattn_heads,
            xattn_head_dim=self.xattn_head_dim,
            xattn_ff_mult=self.xattn_ff_mult,
            xattn_ff_hidden_dim=self.xattn_ff_hidden_dim,
        )
        if not self.image_token or self.image_token.strip() != self.image_token:
            raise ValueError(
                f"injection.image_token must be a non-empty string without outer spaces, got {self.image_token!r}"
            )
        self.xattn_specs()  # validates the activation and norm names

    def xattn_specs(self) -> tuple[AttentionSpec, FeedForwardSpec, NormSpec]:
        """The (attention, MLP, norm) specs of every gated cross-attention block."""
        attn = AttentionSpec(
            heads=self.xattn_heads,
            head_dim=self.xattn_head_dim,
            qkv_bias=self.xattn_qkv_bias,
            out_bias=self.xattn_out_bias,
            qk_norm=self.xattn_qk_norm,
            qk_norm_eps=self.xattn_qk_norm_eps,
        )
        ff = FeedForwardSpec(
            mult=self.xattn_ff_mult,
            hidden_dim=self.xattn_ff_hidden_dim,
            activation=self.xattn_ff_activation,
            gated=self.xattn_ff_gated,
            bias=self.xattn_ff_bias,
        )
        return attn, ff, NormSpec(self.xattn_norm, self.xattn_norm_eps)


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
