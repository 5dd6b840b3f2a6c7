"""OpenFlamingo (``open_flamingo.Flamingo`` or its released ``checkpoint.pt``) -> `VisionLanguageModel`.

OpenFlamingo is an open_clip ViT (tokens after its final LayerNorm, class token dropped), the Flamingo
Perceiver Resampler at the vision width (LayerNorm, ``to_kv`` over cat(media, latents), no biases,
6 layers of 8 x 64 heads, 64 latents, no frame / media-time embeddings in the released models), and a
causal LM with a ``GatedCrossAttentionBlock`` before decoder layer i when (i + 1) % k == 0: LayerNorm on
the text only, k/v from the resampled images (at the vision width, no norm), GELU MLP, scalar tanh
gates, no biases; each token sees the latest ``<image>`` at or before it and text before any image
gets a zero attention output, while the FF branch updates every token. Generation stops at
``<|endofchunk|>`` in its own code (pass ``eos_token_id`` to ours to do the same).

``from_open_flamingo(flamingo, tokenizer)`` converts the object in memory; ``load_open_flamingo``
reads the released ``checkpoint.pt`` (``torch.load(weights_only=True)``) onto the open_clip tower and
the LM it was built on, without the ``open_flamingo`` package. Both go through `load_flamingo_state`,
which maps OpenFlamingo's parameter names onto ours and refuses any name it does not know.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import InjectionConfig, LMConfig, LoRAConfig, ProjectorConfig, ResamplerConfig, VisionConfig, VLMConfig
from ..model import VisionLanguageModel
from ..registry import get_family

__all__ = ["OPEN_FLAMINGO_MODELS", "from_open_flamingo", "load_open_flamingo", "load_flamingo_state", "flamingo_config"]

# hub id -> (open_clip name, tag, LM hub id, cross_attn_every_n_layers), from OpenFlamingo's README
OPEN_FLAMINGO_MODELS = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": ("ViT-L-14", "openai", "anas-awadalla/mpt-1b-redpajama-200b", 1),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": (
        "ViT-L-14",
        "openai",
        "anas-awadalla/mpt-1b-redpajama-200b-dolly",
        1,
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": (
        "ViT-L-14",
        "openai",
        "togethercomputer/RedPajama-INCITE-Base-3B-v1",
        2,
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": (
        "ViT-L-14",
        "openai",
        "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
        2,
    ),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": ("ViT-L-14", "openai", "mosaicml/mpt-7b", 4),
}
# OpenFlamingo's own table of decoder-layer paths (its factory's), for LM families outside vlm.registry
_LAYER_PATHS = {"mpt": "transformer.blocks", "mosaic_gpt": "transformer.blocks", "gptj": "transformer.h"}
_PERCEIVER_NAMES = {  # OpenFlamingo perceiver layer part -> ours
    "0.norm_media": "norm_kv",
    "0.norm_latents": "norm_q",
    "0.to_q": "attn.to_q",
    "0.to_kv": "attn.to_kv",
    "0.to_out": "attn.to_out",
    "1.0": "norm_ff",
    "1.1": "ff.fc1",
    "1.3": "ff.fc2",
}
_BLOCK_NAMES = {  # OpenFlamingo GatedCrossAttentionBlock part -> ours
    "attn_gate": "attn_gate",
    "ff_gate": "ff_gate",
    "attn.norm": "norm_attn",
    "attn.to_q": "attn.to_q",
    "attn.to_kv": "attn.to_kv",
    "attn.to_out": "attn.to_out",
    "ff.0": "norm_ff",
    "ff.1": "ff.fc1",
    "ff.3": "ff.fc2",
}


def decoder_layer_path(lm: nn.Module) -> str:
    """Where the LM keeps its decoder layers: vlm.registry, or OpenFlamingo's table for MPT / GPT-J."""
    model_type = lm.config.model_type
    family = get_family(model_type)
    if family is not None:
        return family.layers_path
    if model_type in _LAYER_PATHS:
        return _LAYER_PATHS[model_type]
    raise ValueError(f"OpenFlamingo: no decoder-layer path known for LM family {model_type!r}: pass decoder_layers=")


def flamingo_config(
    state: dict[str, Tensor],
    *,
    vision: VisionConfig,
    lm_name: str,
    decoder_layers: str,
    every_k: int,
    heads: int = 8,
    resampler_heads: int = 8,
    lora: LoRAConfig | None = None,
) -> VLMConfig:
    """The `VLMConfig` of an OpenFlamingo state dict: sizes read from the tensors' shapes, head counts
    from the arguments (OpenFlamingo's defaults: 8 everywhere)."""
    latents = state["perceiver.latents"]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k)))
    q = state["perceiver.layers.0.0.to_q.weight"]
    time = state.get("perceiver.media_time_embs")
    frames = state.get("perceiver.frame_embs")
    block = _block_prefixes(state, decoder_layers)
    if not block:
        raise ValueError("OpenFlamingo state: no gated cross-attention layers found")
    first = next(iter(block.values()))
    to_q = state[f"{first}attn.to_q.weight"]
    resampler = ResamplerConfig(
        depth=depth,
        num_latents=latents.shape[0],
        heads=resampler_heads,
        head_dim=q.shape[0] // resampler_heads,
        ff_hidden_dim=state["perceiver.layers.0.1.1.weight"].shape[0],
        norm="layernorm",
        max_media=None if time is None else time.shape[0],
        max_frames=None if frames is None else frames.shape[0],
    )
    injection = InjectionConfig(
        mode="cross_attention",
        image_token="<image>",
        every_k_layers=every_k,
        xattn_layers="last",
        xattn_heads=heads,
        xattn_head_dim=to_q.shape[0] // heads,
        xattn_ff_hidden_dim=state[f"{first}ff.1.weight"].shape[0],
        xattn_ff_activation="gelu",
        xattn_ff_bias=False,
        xattn_norm="layernorm",
        xattn_out_bias=False,
        xattn_gate="scalar",
        xattn_ff_scope="all",
        decoder_layers=decoder_layers,
    )
    return VLMConfig(
        vision=vision,
        resampler=resampler,
        projector=ProjectorConfig(kind="none"),
        lm=LMConfig(name_or_path=lm_name),
        lora=LoRAConfig(enabled=False) if lora is None else lora,
        injection=injection,
    )


def _block_prefixes(state: dict[str, Tensor], decoder_layers: str) -> dict[int, str]:
    """Decoder-layer index -> the key prefix of its gated block, in either of OpenFlamingo's layouts."""
    found: dict[int, str] = {}
    patterns = [
        rf"lang_encoder\.{re.escape(decoder_layers)}\.(\d+)\.gated_cross_attn_layer\.",
        r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.",
    ]
    for pattern in patterns:
        for key in state:
            if m := re.match(pattern, key):
                found.setdefault(int(m.group(1)), m.group(0))
    return dict(sorted(found.items()))


def load_flamingo_state(model: VisionLanguageModel, state: dict[str, Tensor], *, load_lm: bool = True) -> list[str]:
    """Copy an OpenFlamingo state dict into ``model`` (built with `flamingo_config`) -> the LM keys loaded.

    ``perceiver.*`` -> the resampler; the gated blocks (``lang_encoder.<layers>.<i>.gated_cross_attn_layer.*``
    or ``lang_encoder.gated_cross_attn_layers.<i>.*``) -> ``model.xattn.blocks``; with ``load_lm``, every
    other ``lang_encoder.*`` tensor (the trained embedding rows of ``<image>`` and ``<|endofchunk|>``;
    ``decoder_layer.`` wrappers unwrapped) -> the LM; ``vision_encoder.*`` -> the tower. Unknown names,
    missing connector tensors and shape mismatches raise before anything is copied.
    """
    path = model.config.injection.decoder_layers
    targets: dict[str, Tensor] = {}
    res = model.resampler
    for key in state:
        if key.startswith("perceiver."):
            targets[key] = _resampler_param(res, key[len("perceiver.") :])
    blocks = _block_prefixes(state, path)
    if sorted(blocks) != model.xattn.layer_indices:
        raise ValueError(
            f"OpenFlamingo state has gated layers before decoder layers {sorted(blocks)}, this model puts them "
            f"before {model.xattn.layer_indices}: check cross_attn_every_n_layers"
        )
    for (_, prefix), block in zip(blocks.items(), model.xattn.blocks):
        for part, ours in _BLOCK_NAMES.items():
            for leaf in ("weight", "bias"):
                key = f"{prefix}{part}" if part.endswith("gate") else f"{prefix}{part}.{leaf}"
                if key in state:
                    targets[key] = _get(block, ours if part.endswith("gate") else f"{ours}.{leaf}")
    lm_state = model.language_model.state_dict(keep_vars=True)
    tower_state = model.vision.visual.state_dict(keep_vars=True)
    loaded_lm = []
    for key in state:
        if key in targets or key.startswith(
            ("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")
        ):
            continue
        if "gated_cross_attn_layer." in key:
            raise ValueError(f"OpenFlamingo state: {key} belongs to no gated layer of this model")
        if key.startswith("vision_encoder."):
            name = key[len("vision_encoder.") :].removeprefix("visual.")
            if name in tower_state:
                targets[key] = tower_state[name]
            elif not name.startswith(("text_projection", "logit_scale", "token_embedding", "ln_final", "transformer.")):
                raise ValueError(f"OpenFlamingo state: {key} is not a parameter of the vision tower")
            continue
        if key.startswith("lang_encoder.") and load_lm:
            name = _lm_name(model.language_model, key[len("lang_encoder.") :].replace(".decoder_layer.", "."), lm_state)
            if name not in lm_state:
                raise ValueError(f"OpenFlamingo state: {key} is not a parameter of the LM ({name!r})")
            targets[key] = lm_state[name]
            loaded_lm.append(name)
        elif not key.startswith("lang_encoder."):
            raise ValueError(f"OpenFlamingo state: unexpected tensor {key}")
    covered = {id(t) for t in targets.values()}
    connector = [*(f"resampler.{n}" for n, _ in res.named_parameters())]
    connector += [f"xattn.{n}" for n, _ in model.xattn.named_parameters()]
    params = [*res.parameters(), *model.xattn.parameters()]
    missing = [name for name, p in zip(connector, params) if id(p) not in covered]
    if missing:
        raise ValueError(f"OpenFlamingo state: no tensor for {missing[:5]} ({len(missing)} missing)")
    for key, target in targets.items():
        value = state[key]
        if value.numel() != target.numel():
            raise ValueError(f"OpenFlamingo state: {key} has shape {tuple(value.shape)}, ours {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key].reshape(target.shape).to(target))
    return loaded_lm


def _lm_name(lm: nn.Module, name: str, lm_state: dict) -> str:
    """``name`` as the LM calls it now: checkpoints saved under older transformers use older names
    (GPT-NeoX's ``embed_out`` is ``lm_head`` in transformers 5); transformers' own renaming rules say how."""
    if name in lm_state:
        return name
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
    except ImportError:  # transformers without renaming rules: names never changed there
        return name
    for rule in extract_weight_conversions_for_model(lm) or []:
        sources, targets = getattr(rule, "source_patterns", []), getattr(rule, "target_patterns", [])
        if type(rule).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            renamed = re.sub(sources[0], targets[0], name)
            if renamed in lm_state:
                return renamed
    return name


def _resampler_param(resampler: nn.Module, name: str) -> Tensor:
    if name == "latents":
        return resampler.latents
    if name == "media_time_embs":
        return resampler.media_time_embeddings  # (T, 1, D) -> (T, D)
    if name == "frame_embs":
        return resampler.frame_embeddings
    if m := re.fullmatch(r"norm\.(weight|bias)", name):
        return getattr(resampler.norm, m.group(1))
    m = re.fullmatch(r"layers\.(\d+)\.(\d\.\w+|\d\.\d)\.(weight|bias)", name)
    if m is None or m.group(2) not in _PERCEIVER_NAMES:
        raise ValueError(f"OpenFlamingo state: unexpected resampler tensor perceiver.{name}")
    return _get(resampler.layers[int(m.group(1))], f"{_PERCEIVER_NAMES[m.group(2)]}.{m.group(3)}")


def _get(module: nn.Module, dotted: str) -> Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    if module is None:
        raise ValueError(f"OpenFlamingo state: this model has no {dotted}")
    return module


def _restore_lm(flamingo: nn.Module) -> nn.Module:
    """Flamingo's LM back to the plain transformers model: original decoder layers, original class,
    no Flamingo attributes (its ``extend_instance`` mixin is the first base of the patched class)."""
    lm = flamingo.lang_encoder
    path = lm.decoder_layers_attr_name
    parent = lm
    *parents, leaf = path.split(".")
    for part in parents:
        parent = getattr(parent, part)
    setattr(parent, leaf, lm.old_decoder_blocks)
    del lm.old_decoder_blocks, lm.gated_cross_attn_layers
    for attr in ("initialized_flamingo", "media_token_id", "decoder_layers_attr_name", "_use_cached_vision_x"):
        lm.__dict__.pop(attr, None)
    bases = type(lm).__bases__
    if bases and bases[0].__name__ == "FlamingoLMMixin":
        lm.__class__ = bases[1]
    return lm


def from_open_flamingo(
    flamingo: nn.Module,
    tokenizer,
    *,
    vision_name: str = "ViT-L-14",
    vision_pretrained: str | None = "openai",
    preprocess=None,
    lora: LoRAConfig | None = None,
) -> VisionLanguageModel:
    """A `VisionLanguageModel` computing what ``flamingo`` computes (see the module docstring).

    ``tokenizer``: the one ``create_model_and_transforms`` returned (with ``<image>`` and
    ``<|endofchunk|>``); ``vision_name`` / ``vision_pretrained``: the open_clip tower's name and tag, for
    the manifest (every released model: ViT-L-14, openai). The converted model takes over ``flamingo``'s
    LM (its decoder layers and class restored) and tower; ``flamingo`` is not usable afterwards.
    """
    if not hasattr(flamingo, "perceiver") or not hasattr(flamingo, "lang_encoder"):
        raise TypeError(f"from_open_flamingo: expected an open_flamingo Flamingo, got {type(flamingo).__name__}")
    attn = flamingo.perceiver.layers[0][0]
    block = next(b for b in flamingo.lang_encoder.gated_cross_attn_layers if b is not None)
    if not block.attn.only_attend_immediate_media:
        raise ValueError(
            "from_open_flamingo: only_attend_immediate_media=False (attend to all earlier images) is not supported"
        )
    path = flamingo.lang_encoder.decoder_layers_attr_name
    indices = [i for i, b in enumerate(flamingo.lang_encoder.gated_cross_attn_layers) if b is not None]
    state = {k: v for k, v in flamingo.state_dict().items() if k.startswith(("perceiver.", "lang_encoder."))}
    lm = _restore_lm(flamingo)
    vision = VisionConfig(name=vision_name, pretrained=vision_pretrained)
    config = flamingo_config(
        state,
        vision=vision,
        lm_name=getattr(lm.config, "name_or_path", ""),
        decoder_layers=path,
        every_k=indices[0] + 1,
        heads=block.attn.heads,
        resampler_heads=attn.heads,
        lora=lora,
    )
    model = VisionLanguageModel.from_parts(flamingo.vision_encoder, lm, tokenizer, config, preprocess=preprocess)
    load_flamingo_state(model, state, load_lm=False)  # the LM is OpenFlamingo's own already
    return model.eval()


def load_open_flamingo(
    checkpoint: str | Path | dict[str, Tensor],
    vision_model: nn.Module,
    lm: nn.Module,
    tokenizer,
    *,
    cross_attn_every_n_layers: int,
    vision_name: str = "ViT-L-14",
    vision_pretrained: str | None = "openai",
    decoder_layers: str | None = None,
    preprocess=None,
    lora: LoRAConfig | None = None,
) -> VisionLanguageModel:
    """A released OpenFlamingo ``checkpoint.pt`` on the open_clip model and the LM it was built on.

    Does what OpenFlamingo's factory does, on a copy of ``tokenizer``: adds ``<|endofchunk|>`` and
    ``<image>`` (and ``<PAD>`` when it has no pad token), grows the LM's embeddings to match, then loads
    the checkpoint's perceiver, gated layers and LM tensors (the trained embedding rows). See
    ``OPEN_FLAMINGO_MODELS`` for the tower, LM and interval of each release.
    """
    state = (
        checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu", weights_only=True)
    )
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    path = decoder_layer_path(lm) if decoder_layers is None else decoder_layers
    config = flamingo_config(
        state,
        vision=VisionConfig(name=vision_name, pretrained=vision_pretrained),
        lm_name=getattr(lm.config, "name_or_path", ""),
        decoder_layers=path,
        every_k=cross_attn_every_n_layers,
        lora=lora,
    )
    model = VisionLanguageModel.from_parts(vision_model, lm, tokenizer, config, preprocess=preprocess)
    load_flamingo_state(model, state)
    return model.eval()
