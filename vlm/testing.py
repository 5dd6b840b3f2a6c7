"""Tiny, offline, deterministic building blocks for tests and examples.

Nothing here downloads: the vision tower is a tiny open_clip ViT registered from a JSON config, the
language models are random ``AutoConfig.for_model`` configs of each family, and the tokenizer is a
byte-level BPE trained on the fly with ``tokenizers``.

    from vlm.testing import tiny_parts
    vision, preprocess, lm, tokenizer = tiny_parts("llama")
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from .backbones import build_caption_tokenizer
from .io import atomic_write

__all__ = [
    "TINY_CLIP_NAME",
    "TINY_FAMILIES",
    "register_tiny_clip",
    "tiny_clip",
    "tiny_tokenizer",
    "tiny_lm_config",
    "tiny_lm",
    "tiny_parts",
    "tiny_vlm_config",
    "tiny_vlm",
    "tiny_images",
]

TINY_CLIP_NAME = "perceiver-vlm-tiny-vit"
_TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

# Words the tiny tokenizer is trained on: captions of synthetic shapes and a few prompts.
_CORPUS = [
    "a small red circle on the left",
    "a large blue square on the right",
    "a green triangle in the middle of the image",
    "two yellow stars at the top and a purple cross at the bottom",
    "Caption: Describe the image. Question: What is in this picture? Answer:",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "an orange hexagon, a white ring and a black diamond.",
]

# Per-family kwargs on top of the common tiny shape (hidden 32, 2 layers, 4 heads, mlp 64).
_FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 2, "sliding_window": None},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 8},
    "gemma": {"num_key_value_heads": 2, "head_dim": 8},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64},
    "gemma3_text": {"num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64},
    "phi": {},
    "phi3": {"num_key_value_heads": 2},
    "gpt2": {"n_inner": 64},
    "gpt_neox": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "smollm3": {"num_key_value_heads": 2},
    "starcoder2": {"num_key_value_heads": 2},
    "olmo2": {"num_key_value_heads": 2},
    "stablelm": {"num_key_value_heads": 2},
    "granite": {"num_key_value_heads": 2},
    "olmo": {"num_key_value_heads": 2},
    "mixtral": {"num_key_value_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1},
}
TINY_FAMILIES = tuple(_FAMILY_KWARGS)


def register_tiny_clip() -> str:
    """Register the tiny ViT config with open_clip (idempotent) and return its model name."""
    import open_clip

    if TINY_CLIP_NAME in open_clip.list_models():
        return TINY_CLIP_NAME
    folder = Path(tempfile.gettempdir()) / "perceiver_vlm_open_clip"
    folder.mkdir(parents=True, exist_ok=True)
    path = atomic_write(folder / f"{TINY_CLIP_NAME}.json", json.dumps(_TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def tiny_clip(seed: int = 0, pretrained: str | None = None):
    """(open_clip model, eval preprocess) of the tiny ViT with random (seeded) or local weights."""
    import open_clip

    name = register_tiny_clip()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model, preprocess


def tiny_tokenizer():
    """A byte-level BPE with <pad>, <bos>, <eos>, wrapped as a transformers fast tokenizer."""
    return build_caption_tokenizer(_CORPUS, vocab_size=320)


def tiny_lm_config(model_type: str, tokenizer=None, **overrides):
    """A tiny random ``AutoConfig`` of ``model_type`` (hidden 32, 2 layers) matching the tokenizer."""
    from transformers import AutoConfig

    if model_type not in _FAMILY_KWARGS:
        raise ValueError(f"tiny_lm_config: no tiny config for {model_type!r}; known: {sorted(_FAMILY_KWARGS)}")
    tokenizer = tiny_tokenizer() if tokenizer is None else tokenizer
    kwargs = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    kwargs.update(_FAMILY_KWARGS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_lm(model_type: str = "llama", tokenizer=None, seed: int = 0, **overrides):
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_lm_config(model_type, tokenizer, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_parts(model_type: str = "llama", seed: int = 0):
    """(open_clip model, preprocess, LM, tokenizer): everything ``from_parts`` needs, offline."""
    vision, preprocess = tiny_clip(seed)
    tokenizer = tiny_tokenizer()
    lm = tiny_lm(model_type, tokenizer, seed)
    return vision, preprocess, lm, tokenizer


def tiny_vlm_config(model_type: str = "llama", **sections):
    """A ``VLMConfig`` sized for the tiny parts (8 latents, 1 resampler layer, LoRA r=4)."""
    from .config import InjectionConfig, LMConfig, LoRAConfig, ProjectorConfig, ResamplerConfig, VisionConfig, VLMConfig

    defaults = {
        "vision": VisionConfig(name=register_tiny_clip(), pretrained=None),
        "resampler": ResamplerConfig(depth=1, num_latents=8, heads=2, head_dim=16, ff_mult=2.0),
        "projector": ProjectorConfig(kind="mlp"),
        "lm": LMConfig(name_or_path=f"tiny-random-{model_type}"),
        "lora": LoRAConfig(r=4, alpha=8, dropout=0.0),
        "injection": InjectionConfig(),
    }
    defaults.update(sections)
    return VLMConfig(**defaults)


def tiny_vlm(model_type: str = "llama", seed: int = 0, **sections):
    """A ``VisionLanguageModel`` built from the tiny parts (seeded, so two calls are identical)."""
    from .model import VisionLanguageModel

    vision, preprocess, lm, tokenizer = tiny_parts(model_type, seed)
    torch.manual_seed(seed + 1)
    config = tiny_vlm_config(model_type, **sections)
    return VisionLanguageModel.from_parts(vision, lm, tokenizer, config, preprocess=preprocess)


def tiny_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) random images already in the tower's normalized range."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)
