"""The causal LM: loading it (dtype, bitsandbytes 4/8-bit) and its tokenizer, growing its vocabulary,
wrapping it with peft LoRA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import LMConfig, LoRAConfig
from .local import check_local_path
from .registry import lora_targets

__all__ = [
    "load_language_model",
    "load_tokenizer",
    "quantization_config",
    "apply_lora",
    "unwrap_lm",
    "torch_dtype",
    "context_length",
    "add_token_rows",
    "tokenizer_with_image_token",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"lm.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def quantization_config(config: LMConfig):
    """A ``BitsAndBytesConfig`` for ``lm.quantization`` ("4bit"/"8bit"), or None."""
    if config.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "4bit":
        storage = config.bnb_4bit_quant_storage
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.bnb_4bit_double_quant,
            bnb_4bit_compute_dtype=torch_dtype(config.dtype),
            bnb_4bit_quant_storage=torch.uint8 if storage == "uint8" else torch_dtype(storage),
        )
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"lm.quantization must be 'none', '4bit' or '8bit', got {config.quantization!r}")


def load_language_model(config: LMConfig) -> nn.Module:
    """``AutoModelForCausalLM`` from a hub id or local directory, in ``lm.dtype``, optionally quantized."""
    from transformers import AutoModelForCausalLM

    check_local_path(config.name_or_path, "lm.name_or_path")
    kwargs = {
        "revision": config.revision,
        "dtype": torch_dtype(config.dtype),
        "trust_remote_code": config.trust_remote_code,
    }
    quant = quantization_config(config)
    if quant is not None:
        kwargs["quantization_config"] = quant
        # this process's GPU (init_distributed selects cuda:<local rank>), not every rank on cuda:0
        kwargs["device_map"] = {"": f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"}
    return AutoModelForCausalLM.from_pretrained(config.name_or_path, **kwargs)


def load_tokenizer(config: LMConfig):
    from transformers import AutoTokenizer

    check_local_path(config.name_or_path, "lm.name_or_path")
    return AutoTokenizer.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )


def is_quantized(lm: nn.Module) -> bool:
    return bool(getattr(lm, "is_loaded_in_4bit", False) or getattr(lm, "is_loaded_in_8bit", False))


def apply_lora(lm: nn.Module, lora: LoRAConfig, lm_config: LMConfig) -> nn.Module:
    """Freeze the LM, prepare it for k-bit training if quantized, and add peft LoRA adapters."""
    lm.requires_grad_(False)
    if is_quantized(lm):
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=lm_config.gradient_checkpointing)
    elif lm_config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lm_config.gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad; ours do (spliced image embeddings or
        # the LoRA path), but text-only batches may not.
        lm.enable_input_require_grads()
    if not lora.enabled:
        return lm
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(lm.config.model_type, lora.target_modules)
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
    )
    try:
        return get_peft_model(lm, peft_config)
    except ValueError as err:
        raise ValueError(
            f"LoRA targets {targets} do not fit LM family {lm.config.model_type!r}: {err}; "
            f'set lora.target_modules (e.g. ["all-linear"])'
        ) from err


def unwrap_lm(lm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    from peft import PeftModel

    return lm.get_base_model() if isinstance(lm, PeftModel) else lm


def context_length(config) -> int | None:
    """The LM's context length from its HF config (None when it names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenizer_with_image_token(tokenizer, image_token: str):
    """``tokenizer`` with ``image_token`` in its vocabulary and a pad token, never the caller's object
    changed: when either is missing, a deep copy gets it. (Adding ``<image>`` to the caller's tokenizer
    made a second VLM built or loaded in the same process see one token more than the first.)"""
    needs_token = image_token not in tokenizer.get_vocab()
    needs_pad = tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None
    if not (needs_token or needs_pad):
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    if needs_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if needs_pad:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_token_rows(lm: nn.Module, vocab_size: int) -> tuple[int, list[int]]:
    """Grow the LM's embedding (and untied head) to the tokenizer's size; new rows = mean of the old.

    Returns (rows before, ids of the new rows). Mean init keeps the new ``<image>`` row's logit
    in the range of real tokens; its input row is never used in prefix mode.
    """
    embeddings = lm.get_input_embeddings()
    old = embeddings.num_embeddings
    if vocab_size <= old:
        return old, []
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        inp = lm.get_input_embeddings().weight
        inp[old:] = inp[:old].float().mean(dim=0).to(inp.dtype)
        out = lm.get_output_embeddings()
        if out is not None and out.weight is not inp and out.weight.shape[0] == vocab_size:
            out.weight[old:] = out.weight[:old].float().mean(dim=0).to(out.weight.dtype)
            if getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].float().mean().to(out.bias.dtype)
    return old, list(range(old, vocab_size))
