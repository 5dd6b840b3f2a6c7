"""Adapter-only checkpoints: the trained parts in safetensors plus a JSON manifest.

Saved: resampler, projection, LoRA weights, gated cross-attention blocks and the rows of tokens the
VLM added to the LM's vocabulary. Not saved: the frozen tower and LM (the manifest says where they
come from). Writes are atomic (`vlm.io.atomic_directory`); loads are strict.

    directory/
      adapter.safetensors
      manifest.json    # vision name/tag (+ a registered open_clip config), LM id/revision/model_type/hidden size,
                       # vocab, full config
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from resampler.config import from_dict, to_dict

from .config import VLMConfig
from .io import atomic_directory
from .local import open_clip_model_config, register_open_clip_config

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_manifest", "read_weights", "load_component"]

WEIGHTS = "adapter.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_ROW_KEYS = ("new_token_rows.input", "new_token_rows.output")


def adapter_state_dict(model) -> dict[str, Tensor]:
    """The trained tensors of ``model`` by name (same names as ``model.named_parameters()``)."""
    state = {}
    for name, param in model.named_parameters():
        if name.startswith(("resampler.", "projector.", "xattn.")) or (name.startswith("lm.") and "lora_" in name):
            state[name] = param.detach()
    if model.new_token_ids:
        ids = torch.tensor(model.new_token_ids)
        lm = model.language_model
        state[_ROW_KEYS[0]] = lm.get_input_embeddings().weight.detach()[ids]
        out = lm.get_output_embeddings()
        if out is not None and out.weight is not lm.get_input_embeddings().weight:
            state[_ROW_KEYS[1]] = out.weight.detach()[ids]
    return {k: v.contiguous().cpu() for k, v in state.items()}


def _manifest(model) -> dict:
    import resampler

    lm_cfg = model.lm_config
    return {
        "format_version": FORMAT_VERSION,
        "library": {"name": "perceiver-vlm", "version": resampler.__version__},
        "vision": {
            "kind": model.config.vision.kind,
            "name": model.config.vision.name,
            "pretrained": model.config.vision.pretrained,
            "width": model.vision.width,
            "num_patches": model.vision.num_patches,
            # a tower registered with open_clip.add_model_config exists only where it was registered
            "open_clip_config": open_clip_model_config(model.config.vision.name)
            if model.config.vision.kind == "open_clip"
            else None,
        },
        "lm": {
            "name_or_path": model.config.lm.name_or_path,
            "revision": model.config.lm.revision,
            "model_type": model.model_type,
            "hidden_size": model.hidden_size,
            "vocab_size": model.language_model.get_input_embeddings().num_embeddings,
            "base_vocab_size": model.base_vocab_size,
            "commit_hash": getattr(lm_cfg, "_commit_hash", None),
        },
        "tokenizer": {
            "size": len(model.tokenizer),
            "image_token": model.processor.image_token,
            "image_token_id": model.image_token_id,
            "new_token_ids": list(model.new_token_ids),
        },
        "connector": {  # also in "config"; spelled out for readers of the manifest
            "order": model.config.projector.order,
            "projector": model.config.projector.kind,
            "injection": model.config.injection.mode,
            "xattn_layers": model.xattn.layer_indices if model.xattn is not None else None,
        },
        "config": to_dict(model.config),
    }


def save_adapter(model, directory: str | Path) -> Path:
    """Write ``adapter.safetensors`` + ``manifest.json`` to ``directory`` atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = adapter_state_dict(model)
    manifest = _manifest(model)
    manifest["tensors"] = {k: list(v.shape) for k, v in state.items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an adapter checkpoint: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r}, this library reads {FORMAT_VERSION}"
        )
    return manifest


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    """``adapter.safetensors`` as tensors; a cut or corrupt file is a ValueError saying so."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an adapter checkpoint: {WEIGHTS} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}); nothing was loaded") from None


def load_component(directory: str | Path, prefix: str = "resampler.") -> dict[str, Tensor]:
    """The saved tensors under ``prefix`` with the prefix stripped, e.g. a resampler's state dict
    to plug a trained resampler into another LM."""
    state = read_weights(directory)
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(
            f"{directory}: no tensors under {prefix!r}; prefixes present: {sorted({k.split('.')[0] for k in state})}"
        )
    return out


def _check_compatible(model, manifest: dict, directory: Path) -> None:
    want, got = (
        manifest["lm"],
        {
            "model_type": model.model_type,
            "hidden_size": model.hidden_size,
            "vocab_size": model.language_model.get_input_embeddings().num_embeddings,
        },
    )
    for key, value in got.items():
        if want[key] != value:
            raise ValueError(
                f"{directory}: adapter was trained for an LM with {key}={want[key]!r}, but this LM has "
                f"{key}={value!r} ({want['name_or_path']!r} expected)"
            )
    if manifest["vision"]["width"] != model.vision.width:
        raise ValueError(
            f"{directory}: adapter expects a vision tower of width {manifest['vision']['width']} "
            f"({manifest['vision']['name']!r}), this tower has width {model.vision.width}"
        )
    if manifest["tokenizer"]["image_token_id"] != model.image_token_id:
        raise ValueError(
            f"{directory}: adapter has {manifest['tokenizer']['image_token']!r} at id "
            f"{manifest['tokenizer']['image_token_id']}, this tokenizer has it at {model.image_token_id}"
        )


def _check_given_parts(manifest: dict, directory: Path, vision_model, lm) -> None:
    """Parts passed in memory vs the manifest, before building the VLM modifies them (LoRA layers,
    grown embeddings): a mismatch leaves the caller's models untouched."""
    if lm is not None:
        from .language import unwrap_lm

        hf = unwrap_lm(lm)
        embeddings = hf.get_input_embeddings()
        want = manifest["lm"]
        for key, value in (("model_type", hf.config.model_type), ("hidden_size", embeddings.embedding_dim)):
            if want[key] != value:
                raise ValueError(
                    f"{directory}: adapter was trained for an LM with {key}={want[key]!r}, but this LM has "
                    f"{key}={value!r} ({want['name_or_path']!r} expected)"
                )
        if embeddings.num_embeddings not in (want["base_vocab_size"], want["vocab_size"]):
            raise ValueError(
                f"{directory}: adapter was trained for an LM with vocab_size={want['base_vocab_size']!r} "
                f"(+{want['vocab_size'] - want['base_vocab_size']} added rows), but this LM has "
                f"vocab_size={embeddings.num_embeddings} ({want['name_or_path']!r} expected)"
            )
    visual = getattr(vision_model, "visual", vision_model)
    width = getattr(getattr(visual, "transformer", None), "width", None)
    if width is not None and width != manifest["vision"]["width"]:
        raise ValueError(
            f"{directory}: adapter expects a vision tower of width {manifest['vision']['width']} "
            f"({manifest['vision']['name']!r}), this tower has width {width}"
        )


def load_adapter(
    cls, directory, *, vision_model=None, lm=None, tokenizer=None, preprocess=None, trust_remote_code: bool = False
):
    """Build ``cls`` from the manifest's config (parts loaded by name, or given) and load strictly.

    Everything that can be checked before building is: the manifest's version, the weights file
    (complete, tensors as listed) and the given parts; no partial load on any mismatch.
    ``trust_remote_code`` comes from the caller only, never from the (possibly foreign) manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = from_dict(VLMConfig, manifest["config"])
    config.lm.trust_remote_code = bool(trust_remote_code)
    state = read_weights(directory)
    listed = manifest.get("tensors")
    if listed is not None and {k: list(v.shape) for k, v in state.items()} != listed:
        raise ValueError(f"{directory}: {WEIGHTS} does not hold the tensors its manifest lists; nothing was loaded")
    model = build_for_manifest(cls, manifest, config, directory, vision_model, lm, tokenizer, preprocess)
    load_adapter_weights(model, state, directory)
    return model


def build_for_manifest(cls, manifest: dict, config, where, vision_model=None, lm=None, tokenizer=None, preprocess=None):
    """``cls(config, parts...)`` after checking the given parts against ``manifest`` (and registering its
    open_clip tower config when the tower is loaded by name), checked against the manifest once built."""
    _check_given_parts(manifest, Path(where), vision_model, lm)
    if vision_model is None and config.vision.kind == "open_clip":
        register_open_clip_config(config.vision.name, manifest["vision"].get("open_clip_config"), str(where))
    model = cls(config, vision_model=vision_model, lm=lm, tokenizer=tokenizer, preprocess=preprocess)
    _check_compatible(model, manifest, Path(where))
    return model


def load_adapter_weights(model, state: dict[str, Tensor], where: str | Path = "adapter") -> None:
    """Copy ``state`` into ``model``; missing, unexpected or misshapen tensors raise naming them."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: adapter tensors do not match this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{where}: {name} has shape {tuple(value.shape)}, this model expects {tuple(expected[name].shape)}"
            )
    params = dict(model.named_parameters())
    lm = model.language_model
    ids = torch.tensor(model.new_token_ids, dtype=torch.long)
    with torch.no_grad():
        for name, value in state.items():
            if name == _ROW_KEYS[0]:
                weight = lm.get_input_embeddings().weight
                weight[ids.to(weight.device)] = value.to(weight)
            elif name == _ROW_KEYS[1]:
                weight = lm.get_output_embeddings().weight
                weight[ids.to(weight.device)] = value.to(weight)
            else:
                params[name].copy_(value.to(params[name]))
