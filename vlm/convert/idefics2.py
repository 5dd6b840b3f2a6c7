"""Idefics2 (``Idefics2ForConditionalGeneration``, ``HuggingFaceM4/idefics2-8b``) -> `VisionLanguageModel`.

Idefics2 is a SigLIP-like tower (``Idefics2VisionTransformer``, images at their own aspect ratio with
a patch mask), a connector that maps the tower's tokens to the LM width FIRST (a SwiGLU MLP, no
biases) and then resamples them at the LM width (RMSNorm, grouped kv heads, context then latents in
the keys, 64 latents), and a Mistral decoder that reads the 64 image tokens per image in place of the
``<image>`` placeholders the processor puts between ``<fake_token_around_image>`` tokens.

The converted model: a ``kind="idefics2"`` tower, ``projector.kind="swiglu"`` with
``order="project_then_resample"``, the resampler via `resampler.convert.from_idefics2`, prefix injection
with ``num_latents`` placeholders per image, and a causal LM of the text config's family whose decoder
and head ARE Idefics2's modules (no copy: a 4-bit Idefics2 stays 4-bit). Its forward takes the Idefics2
processor's ``input_ids``, ``pixel_values`` and ``pixel_attention_mask`` as they are (all-zero padding
images are dropped, as Idefics2 does).
"""

from __future__ import annotations

import torch
from torch import nn

from resampler.convert import from_idefics2 as resampler_from_idefics2

from ..config import InjectionConfig, LMConfig, LoRAConfig, ProjectorConfig, VisionConfig, VLMConfig
from ..hf_vision import ImageProcessorTransform
from ..model import VisionLanguageModel
from .common import activation, check_materialized, check_not_quantized, empty_model, source_name, vlm_resampler_config

QLORA_SKIP = ["model.vision_model", "model.connector", "lm_head"]  # bitsandbytes: quantize the decoder only

__all__ = ["from_idefics2", "idefics2_config", "idefics2_parts"]


def _check(model: nn.Module) -> None:
    if type(model).__name__ != "Idefics2ForConditionalGeneration":
        raise TypeError(f"from_idefics2: expected an Idefics2ForConditionalGeneration, got {type(model).__name__}")


def idefics2_config(model: nn.Module, lora: LoRAConfig | None = None, resampler=None) -> VLMConfig:
    """The `VLMConfig` of a converted Idefics2; ``resampler``: the converted one, when already made."""
    _check(model)
    resampler = resampler_from_idefics2(model.model.connector) if resampler is None else resampler
    text = model.config.text_config
    name = source_name(model, "idefics2")
    return VLMConfig(
        vision=VisionConfig(kind="idefics2", name=name, pretrained=None, layer="last"),
        resampler=vlm_resampler_config(resampler),
        projector=ProjectorConfig(
            kind="swiglu",
            hidden_dim=text.intermediate_size,
            activation=activation(text.hidden_act, "from_idefics2"),
            order="project_then_resample",
        ),
        lm=LMConfig(name_or_path=name, dtype=str(model.dtype).removeprefix("torch.")),
        lora=LoRAConfig(enabled=False) if lora is None else lora,
        injection=InjectionConfig(mode="prefix", image_token="<image>"),
    )


def idefics2_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(Idefics2's vision transformer, a causal LM whose decoder and head are Idefics2's modules)."""
    from transformers import AutoModelForCausalLM

    _check(model)
    text_config = model.config.text_config
    cls = AutoModelForCausalLM._model_mapping[type(text_config)]
    lm = empty_model(cls, text_config)
    setattr(lm, lm.base_model_prefix, model.model.text_model)
    lm.lm_head = model.lm_head
    lm.config.name_or_path = source_name(model, "")
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(lm, flag, True)
    check_materialized(lm, "from_idefics2")
    return model.model.vision_model, lm.eval()


def from_idefics2(
    model: nn.Module, tokenizer, *, image_processor=None, lora: LoRAConfig | None = None
) -> VisionLanguageModel:
    """A `VisionLanguageModel` computing what ``model`` computes (see the module docstring).

    ``tokenizer``: Idefics2's (with its ``<image>`` token); ``image_processor``: its image processor, for
    PIL images (resized to the tower's square ``image_size``); ``lora``: LoRA on the LM (off by default).
    The converted model reuses ``model``'s modules: don't keep using ``model`` afterwards for training.
    """
    _check(model)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>") if "<image>" in tokenizer.get_vocab() else None
    if image_token_id != model.config.image_token_id:
        raise ValueError(
            f"from_idefics2: the tokenizer's '<image>' id is {image_token_id}, the model's image_token_id is "
            f"{model.config.image_token_id}: pass Idefics2's own tokenizer"
        )
    check_not_quantized(
        "from_idefics2", QLORA_SKIP, connector=model.model.connector, vision_model=model.model.vision_model
    )
    resampler = resampler_from_idefics2(model.model.connector).float()  # the connector runs in fp32
    config = idefics2_config(model, lora, resampler)
    vision, lm = idefics2_parts(model)
    square = vision.config.image_size
    preprocess = None if image_processor is None else ImageProcessorTransform(image_processor, square)
    vlm = VisionLanguageModel.from_parts(vision, lm, tokenizer, config, preprocess=preprocess, resampler=resampler)
    theirs = model.model.connector.modality_projection
    with torch.no_grad():
        vlm.projector.fc1.weight.copy_(torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]))
        vlm.projector.fc2.weight.copy_(theirs.down_proj.weight)
    return vlm.eval()
