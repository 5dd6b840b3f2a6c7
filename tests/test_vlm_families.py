"""Every registered LM family, tiny and random: LoRA forward/backward, generation, adapter round trip,
the registry's entries, and an unregistered family through the all-linear fallback."""

from __future__ import annotations

import pytest
import torch

from vlm import LM_FAMILIES, InjectionConfig, VisionLanguageModel
from vlm.registry import decoder_layers
from vlm.testing import (
    TINY_FAMILIES,
    tiny_clip,
    tiny_images,
    tiny_lm,
    tiny_parts,
    tiny_tokenizer,
    tiny_vlm,
    tiny_vlm_config,
)

REQUIRED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
    "smollm3",
)
XATTN = dict(mode="cross_attention", every_k_layers=1, xattn_heads=2, xattn_head_dim=8)


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _round_trip(family: str, tmp_path, **sections):
    """LoRA forward+backward (exactly the trainable params get grads), generation, save -> load."""
    model = tiny_vlm(family, **sections)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora, f"{family}: no LoRA parameters were created"
    model.train()
    batch = model.processor(["Caption:", "<image>a <image>b"], captions=["a red circle", "two"], num_images=[1, 2])
    images = tiny_images(3)
    model(images=images, **batch).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    model.zero_grad(set_to_none=True)

    _perturb(model).eval()
    prompts = ["Caption:", "Question: What is in this picture? Answer:"]
    batched = model.generate(images[:2], prompts, max_new_tokens=4)
    assert batched == [model.generate(images[i : i + 1], [prompts[i]], max_new_tokens=4)[0] for i in range(2)]

    logits = model(images=images, **batch).logits
    model.save_adapter(tmp_path / "adapter")
    vision, preprocess, lm, tok = tiny_parts(family, seed=0)
    loaded = VisionLanguageModel.load_adapter(tmp_path / "adapter", vision, lm, tok, preprocess=preprocess).eval()
    assert torch.equal(loaded(images=images, **batch).logits, logits)
    assert loaded.generate(images[:2], prompts, max_new_tokens=4) == batched


def test_required_families_are_covered():
    assert set(REQUIRED) <= set(TINY_FAMILIES) and set(TINY_FAMILIES) <= set(LM_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_prefix_lora_generate_round_trip(family, tmp_path):
    _round_trip(family, tmp_path)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_cross_attention_round_trip(family, tmp_path):
    _round_trip(family, tmp_path, injection=InjectionConfig(**XATTN))


@pytest.mark.parametrize("family", sorted(LM_FAMILIES))
def test_registry_entry_matches_a_tiny_model(family):
    """The layer path resolves, and every LoRA target names a linear layer that exists."""
    lm = tiny_lm(family)
    layers = decoder_layers(lm, family)
    assert len(layers) == lm.config.num_hidden_layers
    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    assert set(LM_FAMILIES[family].lora_targets) <= names


_UNREGISTERED = {
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4},
    "gpt_bigcode": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "cohere": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "glm4": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "head_dim": 8,
    },
}


@pytest.mark.parametrize("family", sorted(_UNREGISTERED))
def test_unregistered_family_trains_with_all_linear_lora_by_default(family, caplog):
    """Regression: a family outside the registry used to be refused unless lora.target_modules was set."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert family not in LM_FAMILIES
    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **_UNREGISTERED[family],
    )  # fmt: skip
    torch.manual_seed(0)
    clip, _ = tiny_clip()
    lm = AutoModelForCausalLM.from_config(config)
    head = lm.get_output_embeddings()
    linear = {n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    with caplog.at_level("INFO", logger="vlm.registry"):
        model = VisionLanguageModel.from_parts(clip, lm, tok, tiny_vlm_config(family))
    assert "all-linear" in caplog.text and repr(family) in caplog.text
    wrapped = {n for n, m in model.language_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == linear  # LoRA on every linear layer but the output head
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model(images=tiny_images(1), **batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    assert len(model.generate(tiny_images(1), "Caption:", max_new_tokens=3)) == 1


def test_unregistered_family_cross_attention_needs_the_layer_path():
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = AutoConfig.for_model("bloom", vocab_size=len(tok), eos_token_id=tok.eos_token_id, **_UNREGISTERED["bloom"])
    clip, _ = tiny_clip()
    with pytest.raises(ValueError, match=r"gated cross-attention needs the decoder-layer path of LM family 'bloom'"):
        VisionLanguageModel.from_parts(
            clip,
            AutoModelForCausalLM.from_config(config),
            tok,
            tiny_vlm_config("bloom", injection=InjectionConfig(**XATTN)),
        )
    injection = InjectionConfig(**XATTN, decoder_layers="transformer.h")
    model = VisionLanguageModel.from_parts(
        clip, AutoModelForCausalLM.from_config(config), tiny_tokenizer(), tiny_vlm_config("bloom", injection=injection)
    )
    assert len(model.xattn.blocks) == 2
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model(images=tiny_images(1), **batch).loss.backward()
