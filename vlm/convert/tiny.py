"""Tiny random reference VLMs, built offline, for the converters' tests and examples.

Each builder returns the reference model (eval mode, fp32) and its own processor / tokenizer, sized
so that a CPU runs them in milliseconds; weights are drawn with a large std so logits are peaked and
greedy generation is not degenerate.

    hf, processor = tiny_idefics()            # IdeficsForVisionText2Text + IdeficsProcessor
    hf, processor = tiny_idefics2()           # Idefics2ForConditionalGeneration + Idefics2Processor
    flamingo, image_processor, tokenizer = tiny_open_flamingo(directory)   # needs `open_flamingo`
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..testing import register_tiny_clip, tiny_lm, tiny_tokenizer

__all__ = ["tiny_idefics", "tiny_idefics2", "tiny_open_flamingo", "tiny_photos"]

IMAGE_SIZE = 32


def _ids(tokenizer) -> dict:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _sized(config: dict, sizes: dict | None) -> dict:
    """``config`` with ``sizes`` laid over it; nested dicts (``vision_config``...) are updated, not replaced."""
    out = dict(config)
    for key, value in (sizes or {}).items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_idefics(
    seed: int = 0,
    *,
    cross_layer_interval: int = 2,
    alpha_type: str = "vector",
    qk_norms: bool = True,
    sizes: dict | None = None,
):
    """(``IdeficsForVisionText2Text``, ``IdeficsProcessor``): 4 decoder layers, gated cross-attention
    every ``cross_layer_interval``, decoupled embeddings (the processor's 3 added tokens live in
    ``additional_vocab_size``), q/k norms in the cross-attention and the resampler, random gates of
    ``alpha_type`` ('vector': one per channel, 'float': one each). ``sizes``: `IdeficsConfig` fields
    laid over these (nested configs are merged; ``vocab_size`` may exceed the tokenizer's), e.g. the
    benchmarks' mid-size model."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessor, IdeficsProcessor

    tokenizer = tiny_tokenizer()
    base_vocab = len(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]}
    )
    kwargs = dict(
        vocab_size=base_vocab,
        additional_vocab_size=len(tokenizer) - base_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=cross_layer_interval,
        qk_layer_norms=qk_norms,
        alpha_type=alpha_type,
        alpha_initializer="zeros",
        initializer_range=0.2,
        max_position_embeddings=256,
        use_resampler=True,
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 8,
            "resampler_depth": 2,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "qk_layer_norms_perceiver": qk_norms,
        },
        vision_config={
            "embed_dim": 24,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 48,
        },
        **_ids(tokenizer),
    )
    kwargs = _sized(kwargs, sizes)
    # a larger vocab_size holds the processor's added tokens in the main table (no additional rows)
    kwargs["additional_vocab_size"] = max(0, len(tokenizer) - kwargs["vocab_size"])
    config = IdeficsConfig(**kwargs)
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    _randomize_gates(model, ("alpha_cross_attn", "alpha_dense"), seed)
    image_size = config.vision_config.image_size
    processor = IdeficsProcessor(IdeficsImageProcessor(image_size=image_size), tokenizer, image_size=image_size)
    return model, processor


def tiny_idefics2(seed: int = 0, *, sizes: dict | None = None):
    """(``Idefics2ForConditionalGeneration``, ``Idefics2Processor``): a Mistral text model with grouped
    key/value heads, 8 ``<image>`` tokens per image, a 2-layer resampler with 2 kv heads. ``sizes``:
    `Idefics2Config` fields laid over these (nested configs merged), as in `tiny_idefics`."""
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
    )

    tokenizer = tiny_tokenizer()
    kwargs = dict(
        vision_config={
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 2 * IMAGE_SIZE,
            "patch_size": 8,
            "initializer_range": 0.2,
        },
        perceiver_config={
            "hidden_size": 32,
            "resampler_n_latents": 8,
            "resampler_depth": 2,
            "resampler_n_heads": 4,
            "resampler_head_dim": 8,
            "num_key_value_heads": 2,
            "initializer_range": 0.2,
        },
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer) + 3,  # with the 3 tokens the processor adds
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "initializer_range": 0.2,
            **_ids(tokenizer),
        },
    )
    kwargs = _sized(kwargs, sizes)
    side = kwargs["vision_config"]["image_size"] // 2  # images between half and all of the tower's size
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=False, size={"shortest_edge": side, "longest_edge": 2 * side}
    )
    seq_len = kwargs["perceiver_config"]["resampler_n_latents"]
    processor = Idefics2Processor(image_processor, tokenizer, image_seq_len=seq_len)  # adds its 3 tokens
    config = Idefics2Config(image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **kwargs)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Idefics2 initialises its resampler latents to ones: move them off it
        latents = model.model.connector.perceiver_resampler.latents
        latents.add_(torch.randn_like(latents))
    return model, processor


def tiny_open_flamingo(directory: str | Path, family: str = "llama", every_k: int = 1, seed: int = 0):
    """(``open_flamingo.Flamingo``, image processor, tokenizer) from ``create_model_and_transforms`` on
    the tiny open_clip ViT and a tiny ``family`` LM saved to ``directory``, with random gates."""
    from open_flamingo import create_model_and_transforms

    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_lm(family, tokenizer, seed=seed, initializer_range=0.2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=register_tiny_clip(),
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=str(directory),
        tokenizer_path=str(directory),
        cross_attn_every_n_layers=every_k,
        use_local_files=True,
    )
    _randomize_gates(model, ("attn_gate", "ff_gate"), seed)
    return model.eval(), image_processor, tokenizer


def _randomize_gates(model: torch.nn.Module, names: tuple[str, ...], seed: int) -> None:
    """Gates start at 0 (the LM alone): draw them so that the images matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(names):
                param.copy_(torch.randn(param.shape, generator=gen))


def tiny_photos(n: int, seed: int = 0, size: tuple[int, int] = (40, 52)) -> list:
    """``n`` random RGB PIL images of ``size`` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
