"""IDEFICS v1 (``IdeficsForVisionText2Text``, ``HuggingFaceM4/idefics-9b`` / ``-80b``) -> `VisionLanguageModel`.

IDEFICS is a frozen CLIP-like tower (``IdeficsVisionTransformer``, every token incl. the class token,
no post LayerNorm), a Perceiver Resampler at the vision width, and a Llama decoder with a gated
cross-attention layer before every ``cross_layer_interval``-th decoder layer (i % k == 0): RMSNorm on
the text, q from the text and k/v from the resampled images (no norm), optional per-head RMSNorm on q
and k, a gated SwiGLU MLP, tanh gates of one value or one per channel (``alpha_type``). A token attends
to the latest image at or before it and to none after an eos (the processor's ``image_attention_mask``);
a token with no image gets a zero attention output (``cross_attention_gate``). Its embeddings and head
are decoupled: ``additional_vocab_size`` rows (the image tokens) sit beside the ``vocab_size`` ones.

The converted model: the tower as a ``kind="idefics"`` tower, the resampler via
`resampler.convert.from_idefics_perceiver`, no projection head (the cross-attention reads the vision
width), a ``LlamaForCausalLM`` holding IDEFICS' own decoder modules (not copies: a 4-bit IDEFICS stays
4-bit) with the decoupled rows concatenated into one embedding and one head, and our gated blocks with
IDEFICS' weights. Its forward takes the IDEFICS processor's ``input_ids`` as they are; images are the
processor's ``pixel_values`` (zero padding slots are dropped) or one list per sample.
"""

from __future__ import annotations

import torch
from torch import nn

from resampler.convert import from_idefics_perceiver

from ..config import InjectionConfig, LMConfig, LoRAConfig, ProjectorConfig, VisionConfig, VLMConfig
from ..hf_vision import ImageProcessorTransform
from ..model import VisionLanguageModel
from .common import activation, check_materialized, check_not_quantized, empty_model, source_name, vlm_resampler_config

QLORA_SKIP = [  # bitsandbytes: quantize the decoder only
    "model.vision_model",
    "model.perceiver_resampler",
    "model.gated_cross_attn_layers",
    "lm_head",
]

__all__ = ["from_idefics", "idefics_config", "idefics_parts"]


def _check(model: nn.Module) -> None:
    if type(model).__name__ != "IdeficsForVisionText2Text":
        raise TypeError(f"from_idefics: expected an IdeficsForVisionText2Text, got {type(model).__name__}")
    if not model.config.use_resampler:
        raise ValueError("from_idefics: this IDEFICS has no perceiver resampler (use_resampler=False); not supported")


def idefics_config(model: nn.Module, lora: LoRAConfig | None = None, resampler=None) -> VLMConfig:
    """The `VLMConfig` of a converted IDEFICS (every variant option spelled out); ``resampler``: the
    converted one, when already made."""
    _check(model)
    resampler = from_idefics_perceiver(model.model.perceiver_resampler) if resampler is None else resampler
    c = model.config
    name = source_name(model, "idefics")
    return VLMConfig(
        vision=VisionConfig(kind="idefics", name=name, pretrained=None, layer="last", keep_cls=True),
        resampler=vlm_resampler_config(resampler),
        projector=ProjectorConfig(kind="none"),
        lm=LMConfig(name_or_path=name, dtype=str(model.dtype).removeprefix("torch.")),
        lora=LoRAConfig(enabled=False) if lora is None else lora,
        injection=InjectionConfig(
            mode="cross_attention",
            image_token="<image>",
            every_k_layers=c.cross_layer_interval,
            xattn_layers="first",
            xattn_heads=c.num_attention_heads,
            xattn_head_dim=c.hidden_size // c.num_attention_heads,
            xattn_ff_hidden_dim=c.intermediate_size,
            xattn_ff_activation=activation(c.hidden_act, "from_idefics"),
            xattn_ff_gated=True,
            xattn_ff_bias=False,
            xattn_norm="rmsnorm",
            xattn_norm_eps=c.rms_norm_eps,
            xattn_qk_norm="rmsnorm" if c.qk_layer_norms else None,
            xattn_qk_norm_eps=c.rms_norm_eps if c.qk_layer_norms else None,
            xattn_qkv_bias=False,
            xattn_out_bias=False,
            xattn_gate="vector" if c.alpha_type == "vector" else "scalar",
            xattn_ff_scope="all",
            xattn_reset_after_eos=True,
            decoder_layers="model.layers",
        ),
    )


def idefics_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(IDEFICS' vision transformer, a ``LlamaForCausalLM`` built from IDEFICS' decoder modules): the
    frozen base parts, e.g. for ``VisionLanguageModel.load_adapter(directory, *idefics_parts(hf), tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _check(model)
    c, theirs = model.config, model.model
    config = LlamaConfig(
        vocab_size=c.vocab_size + c.additional_vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        hidden_act=c.hidden_act,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    config.name_or_path = source_name(model, "")
    lm = empty_model(LlamaForCausalLM, config)
    for ours, layer in zip(lm.model.layers, theirs.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(ours.self_attn, proj, getattr(layer.self_attn, proj))  # the module itself (4-bit stays 4-bit)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(ours.mlp, proj, getattr(layer.mlp, proj))
        ours.input_layernorm.weight = layer.input_layernorm.weight
        ours.post_attention_layernorm.weight = layer.post_attention_layernorm.weight
    lm.model.norm.weight = theirs.norm.weight
    embed = theirs.embed_tokens
    rows = [embed.weight] + ([embed.additional_embedding.weight] if embed.num_additional_embeddings else [])
    lm.model.embed_tokens = nn.Embedding.from_pretrained(
        torch.cat(rows).detach(), freeze=True, padding_idx=c.pad_token_id
    )
    head = model.lm_head
    rows = [head.weight] + ([head.additional_fc.weight] if head.out_additional_features else [])
    lm.lm_head = nn.Linear(c.hidden_size, config.vocab_size, bias=False, device="meta")
    lm.lm_head.weight = nn.Parameter(torch.cat(rows).detach(), requires_grad=False)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(lm, flag, True)
    check_materialized(lm, "from_idefics")
    return theirs.vision_model, lm.eval()


def _copy_block(ours, theirs) -> None:
    attn = theirs.cross_attn
    with torch.no_grad():
        ours.norm_attn.weight.copy_(theirs.input_layernorm.weight)
        ours.attn.to_q.weight.copy_(attn.q_proj.weight)
        ours.attn.to_kv.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight]))
        ours.attn.to_out.weight.copy_(attn.o_proj.weight)
        if attn.qk_layer_norms:
            ours.attn.q_norm.weight.copy_(attn.q_layer_norm.weight)
            ours.attn.k_norm.weight.copy_(attn.k_layer_norm.weight)
        ours.attn_gate.copy_(theirs.alpha_cross_attn.reshape(-1))
        ours.norm_ff.weight.copy_(theirs.post_attention_layernorm.weight)
        ours.ff.fc1.weight.copy_(torch.cat([theirs.mlp.gate_proj.weight, theirs.mlp.up_proj.weight]))
        ours.ff.fc2.weight.copy_(theirs.mlp.down_proj.weight)
        ours.ff_gate.copy_(theirs.alpha_dense.reshape(-1))


def from_idefics(
    model: nn.Module, tokenizer, *, image_processor=None, lora: LoRAConfig | None = None
) -> VisionLanguageModel:
    """A `VisionLanguageModel` computing what ``model`` computes (see the module docstring).

    ``tokenizer``: IDEFICS' (its ``<image>`` must be in it); ``image_processor``: IDEFICS' image processor,
    for PIL images; ``lora``: LoRA on the converted LM (off by default). The converted model reuses
    ``model``'s decoder, tower and gates' modules: don't keep using ``model`` afterwards for training.
    """
    _check(model)
    theirs = model.model
    check_not_quantized(
        "from_idefics",
        QLORA_SKIP,
        perceiver_resampler=theirs.perceiver_resampler,
        gated_cross_attn_layers=theirs.gated_cross_attn_layers,
        vision_model=theirs.vision_model,
    )
    resampler = from_idefics_perceiver(theirs.perceiver_resampler).float()  # the connector runs in fp32
    config = idefics_config(model, lora, resampler)
    if "<image>" not in tokenizer.get_vocab():
        raise ValueError("from_idefics: the tokenizer has no '<image>' token; pass IDEFICS' own tokenizer")
    vision, lm = idefics_parts(model)
    preprocess = None if image_processor is None else ImageProcessorTransform(image_processor)
    vlm = VisionLanguageModel.from_parts(vision, lm, tokenizer, config, preprocess=preprocess, resampler=resampler)
    for ours, theirs in zip(vlm.xattn.blocks, model.model.gated_cross_attn_layers):
        _copy_block(ours, theirs)
    return vlm.eval()
