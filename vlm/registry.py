"""LM families keyed by Hugging Face ``model_type``: where the decoder layers are, what LoRA targets.

An unknown family still trains with ``lora.target_modules=["all-linear"]`` (peft's own fallback) and
prefix injection; gated cross-attention needs the decoder-layer path, so it raises naming what to add.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["LMFamily", "LM_FAMILIES", "ALL_LINEAR", "get_family", "lora_targets", "decoder_layers"]

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
        raise ValueError(
            f"LM family {model_type!r} is not in vlm.registry.LM_FAMILIES (known: {sorted(LM_FAMILIES)}); "
            f'set lora.target_modules=["all-linear"] or list its attention module names, '
            f"or register it in LM_FAMILIES"
        )
    return list(family.lora_targets)


def decoder_layers(lm: nn.Module, model_type: str) -> nn.ModuleList:
    """The decoder-layer ModuleList of a (non-peft) HF causal LM of family ``model_type``."""
    family = get_family(model_type)
    if family is None:
        raise ValueError(
            f"gated cross-attention needs the decoder-layer path of LM family {model_type!r}, which is not in "
            f"vlm.registry.LM_FAMILIES (known: {sorted(LM_FAMILIES)}); add LM_FAMILIES[{model_type!r}] = "
            f'LMFamily("<path.to.layers>", (<lora targets>)) or use injection.mode="prefix"'
        )
    module = lm
    for part in family.layers_path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"{type(lm).__name__} has no {family.layers_path!r} (registry entry for {model_type!r})")
        module = getattr(module, part)
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{family.layers_path!r} of {type(lm).__name__} is {type(module).__name__}, not a ModuleList")
    return module
