"""LM families keyed by Hugging Face ``model_type``: where the decoder layers are, what LoRA targets.

An unknown family (bloom, cohere, gpt_bigcode, glm4, ...) trains with LoRA on every linear layer but
the output head (peft's ``"all-linear"``; logged) and prefix injection; gated cross-attention needs the
decoder-layer path (``injection.decoder_layers`` or a registry entry), so it raises naming what to add.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

__all__ = ["LMFamily", "LM_FAMILIES", "ALL_LINEAR", "get_family", "lora_targets", "decoder_layers"]

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LMFamily:
    layers_path: str  # dotted path from the *CausalLM model to its ModuleList of decoder layers
    lora_targets: tuple[str, ...]  # module-name suffixes for peft's target_modules


LM_FAMILIES: dict[str, LMFamily] = {
    **{
        name: LMFamily("model.layers", _LLAMA_TARGETS)
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "smollm3",
            "starcoder2",
            "olmo",
            "olmo2",
            "stablelm",
            "granite",
        )
    },
    "phi": LMFamily("model.layers", ("q_proj", "k_proj", "v_proj", "dense")),
    "phi3": LMFamily("model.layers", ("qkv_proj", "o_proj")),
    "gpt2": LMFamily("transformer.h", ("c_attn", "c_proj")),
    "gpt_neox": LMFamily("gpt_neox.layers", ("query_key_value", "dense")),
    "opt": LMFamily("model.decoder.layers", ("q_proj", "k_proj", "v_proj", "out_proj")),
}


def get_family(model_type: str) -> LMFamily | None:
    return LM_FAMILIES.get(model_type)


def lora_targets(model_type: str, requested: list[str] | None) -> list[str] | str:
    """peft ``target_modules``: the request, ``"all-linear"``, or the registry's list for the family."""
    if requested is not None:
        return ALL_LINEAR if list(requested) == [ALL_LINEAR] else list(requested)
    family = get_family(model_type)
    if family is None:
        log.info(
            "LM family %r is not in vlm.registry.LM_FAMILIES: LoRA on every linear layer but the output head "
            '("all-linear"); set lora.target_modules to choose',
            model_type,
        )
        return ALL_LINEAR
    return list(family.lora_targets)


def decoder_layers(lm: nn.Module, model_type: str, path: str | None = None) -> nn.ModuleList:
    """The decoder-layer ModuleList of a (non-peft) HF causal LM: at ``path`` (dotted), or where the
    registry says for family ``model_type``."""
    family = get_family(model_type)
    if path is None and family is None:
        raise ValueError(
            f"gated cross-attention needs the decoder-layer path of LM family {model_type!r}, which is not in "
            f"vlm.registry.LM_FAMILIES (known: {sorted(LM_FAMILIES)}); set injection.decoder_layers "
            f'("<path.to.layers>"), add LM_FAMILIES[{model_type!r}] = LMFamily("<path.to.layers>", '
            f'(<lora targets>)) or use injection.mode="prefix"'
        )
    path = family.layers_path if path is None else path
    registry = family is not None and path == family.layers_path
    where = f"registry entry for {model_type!r}" if registry else "injection.decoder_layers"
    module = lm
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"{type(lm).__name__} has no {path!r} ({where})")
        module = getattr(module, part)
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{path!r} of {type(lm).__name__} is {type(module).__name__}, not a ModuleList ({where})")
    return module
