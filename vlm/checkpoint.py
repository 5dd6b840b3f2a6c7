"""Adapter-only checkpoints: the trained parts in safetensors plus a JSON manifest (`vlm.manifest`).

Saved: resampler, projection, LoRA weights, gated cross-attention blocks and the rows of tokens the
VLM added to the LM's vocabulary. Not saved: the frozen tower and LM (the manifest says where they
come from). Writes are atomic (`vlm.io.atomic_directory`) and record the sha256 and size of the
weights file (`vlm.integrity`); a state with a non-finite value is never written.

    directory/
      adapter.safetensors
      manifest.json    # vision name/tag (+ a registered open_clip config), LM id/revision/model_type/hidden size,
                       # vocab, full config, digests

Loading an adapter from a stranger (`load_adapter`) runs every check before the caller's objects are
touched, in this order: both files are regular files inside the directory; the manifest is
validated whole; the weights match their digest and the manifest's list and are finite; the parts
passed in fit the manifest; and the VLM is built once on the meta device (the caller's LM rebuilt
from its config without weights, the tokenizer copied) to get the exact names and shapes of the
tensors it will expect, compared with the file. Only then is the real VLM built, which wraps the
caller's LM with LoRA and grows its embeddings. So a refusal leaves the caller's LM, embeddings
and tokenizer bit-identical, and nothing is allocated from the manifest's numbers. Base parts the
caller does not pass are loaded from the names in the manifest, and each such name is logged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from .integrity import IntegrityError, digest, read_verified, regular_file_inside
from .io import atomic_directory, write_bytes
from .language import load_language_model, load_tokenizer
from .local import register_open_clip_config
from .manifest import MANIFEST, build_manifest, manifest_config, read_manifest

__all__ = [
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "build_for_manifest",
    "load_adapter_weights",
    "read_manifest",
    "read_weights",
    "load_component",
]

log = logging.getLogger(__name__)

WEIGHTS = "adapter.safetensors"
_ROW_KEYS = ("new_token_rows.input", "new_token_rows.output")


def _adapter_tensors(model) -> dict[str, Tensor]:
    state = {}
    for name, param in model.named_parameters():
        if name.startswith(("resampler.", "projector.", "xattn.")) or (name.startswith("lm.") and "lora_" in name):
            state[name] = param.detach()
    if model.new_token_ids:
        lm = model.language_model
        weight = lm.get_input_embeddings().weight
        ids = torch.tensor(model.new_token_ids, device=weight.device)
        state[_ROW_KEYS[0]] = weight.detach()[ids]
        out = lm.get_output_embeddings()
        if out is not None and out.weight is not weight:
            state[_ROW_KEYS[1]] = out.weight.detach()[ids.to(out.weight.device)]
    return state


def adapter_state_dict(model) -> dict[str, Tensor]:
    """The trained tensors of ``model`` by name (same names as ``model.named_parameters()``)."""
    return {k: v.contiguous().cpu() for k, v in _adapter_tensors(model).items()}


def save_adapter(model, directory: str | Path, *, step: int | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``manifest.json`` to ``directory`` atomically (``step``: the
    training step, recorded for whoever evaluates it)."""
    from safetensors.torch import save

    from .training.state import non_finite_count

    directory = Path(directory)
    state = adapter_state_dict(model)
    bad = non_finite_count(state)
    if bad:
        raise FloatingPointError(f"save_adapter: {bad} adapter values are not finite; {directory} was not written")
    data = save(state, metadata={"format": "pt"})
    manifest = build_manifest(model, state, {WEIGHTS: digest(data)}, step)
    with atomic_directory(directory) as tmp:
        write_bytes(tmp / WEIGHTS, data)
        write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return directory


def read_weights(directory: str | Path, manifest: dict | None = None) -> dict[str, Tensor]:
    """``adapter.safetensors`` as tensors after the file rule, its digest (from ``manifest``, read from
    ``directory`` when not given) and a finiteness check; any failure is a ValueError saying so."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(directory) / WEIGHTS
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{directory} is not an adapter checkpoint: {WEIGHTS} is missing")
    manifest = read_manifest(directory) if manifest is None else manifest
    record = manifest.get("files", {}).get(WEIGHTS)
    if "files" not in manifest:
        log.warning("%s: saved before adapters recorded sha256 digests; the weights are not verified", directory)
    elif record is None:
        raise ValueError(f"{directory}/{MANIFEST} records no digest for {WEIGHTS}")
    try:
        data = read_verified(directory, WEIGHTS, record)
    except IntegrityError as err:
        raise IntegrityError(f"{err}; nothing was loaded") from None
    try:
        state = load(data)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({err}); nothing was loaded") from None
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{path}: {name} holds {bad} of {value.numel()} non-finite values; refused")
    return state


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


def _check_given_parts(manifest: dict, directory: Path, vision_model, lm) -> None:
    """Parts passed in memory vs the manifest: family, width, vocabulary (clear messages first)."""
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


def _load_missing_parts(config, manifest: dict, directory: Path, vision_model, preprocess, lm, tokenizer):
    """The base parts the caller did not pass, loaded from the names in the (possibly foreign) manifest
    (an open_clip tower registered where the adapter was trained is registered here from the manifest)."""
    if vision_model is None:
        from .towers import load_vision

        if config.vision.kind == "open_clip":
            register_open_clip_config(config.vision.name, manifest["vision"].get("open_clip_config"), str(directory))
        log.info("%s: loading the vision tower its manifest names: %r, pretrained=%r", directory,
                 config.vision.name, config.vision.pretrained)  # fmt: skip
        vision_model, preprocess = load_vision(config.vision)
    if lm is None:
        log.info("%s: loading the LM its manifest names: %r (revision %r)", directory, config.lm.name_or_path,
                 config.lm.revision)  # fmt: skip
        lm = load_language_model(config.lm)
    if tokenizer is None:
        log.info("%s: loading the tokenizer its manifest names: %r", directory, config.lm.name_or_path)
        tokenizer = load_tokenizer(config.lm)
    return vision_model, preprocess, lm, tokenizer


def _meta_lm(lm: nn.Module) -> nn.Module:
    """A weightless copy of ``lm``'s architecture on the meta device (from a copy of its config)."""
    from .language import unwrap_lm

    hf = unwrap_lm(lm)
    with torch.device("meta"):
        return type(hf)(copy.deepcopy(hf.config))


@contextlib.contextmanager
def _flags_kept(module: nn.Module):
    """Restore ``requires_grad`` and train/eval flags that a build sets on a module it wraps."""
    grads = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def _adopt_token_rows(model, manifest: dict) -> None:
    """An LM that already holds the adapter's added rows (built with a tokenizer that had ``<image>``)
    gets them overwritten from the adapter instead of being refused."""
    ids, base = manifest["tokenizer"]["new_token_ids"], manifest["lm"]["base_vocab_size"]
    rows = model.language_model.get_input_embeddings().num_embeddings
    if not model.new_token_ids and ids and rows == manifest["lm"]["vocab_size"] and all(base <= i < rows for i in ids):
        model.base_vocab_size, model.new_token_ids = base, list(ids)


def _expected_tensors(cls, config, manifest, vision_model, lm, tokenizer, preprocess) -> dict[str, tuple]:
    """Names and shapes of the tensors ``cls`` built from these parts will expect, from a build on the
    meta device that touches none of them; image-token and vision-width mismatches raise here."""
    with _flags_kept(vision_model), torch.device("meta"):
        meta = cls(config, vision_model=vision_model, lm=_meta_lm(lm), tokenizer=copy.deepcopy(tokenizer),
                   preprocess=preprocess)  # fmt: skip
    _check_built(meta, manifest)
    _adopt_token_rows(meta, manifest)
    return {k: tuple(v.shape) for k, v in _adapter_tensors(meta).items()}


def _check_built(model, manifest: dict) -> None:
    """A built (meta or real) model vs the manifest: LM family, width and vocabulary, tower, image token."""
    want = manifest["lm"]
    got = {
        "model_type": model.model_type,
        "hidden_size": model.hidden_size,
        "vocab_size": model.language_model.get_input_embeddings().num_embeddings,
    }
    for key, value in got.items():
        if want[key] != value:
            raise ValueError(
                f"adapter was trained for an LM with {key}={want[key]!r}, but this LM has {key}={value!r} "
                f"({want['name_or_path']!r} expected)"
            )
    if manifest["vision"]["width"] != model.vision.width:
        raise ValueError(
            f"adapter expects a vision tower of width {manifest['vision']['width']} "
            f"({manifest['vision']['name']!r}), this tower has width {model.vision.width}"
        )
    want = manifest["tokenizer"]
    if want["image_token_id"] != model.image_token_id:
        raise ValueError(
            f"adapter has {want['image_token']!r} at id {want['image_token_id']}, this tokenizer has it at "
            f"{model.image_token_id}"
        )


def _compare(expected: dict[str, tuple], state: dict[str, Tensor], where) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: adapter tensors do not match this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name]):
            raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, this model expects {expected[name]}")


def load_adapter(
    cls, directory, *, vision_model=None, lm=None, tokenizer=None, preprocess=None, trust_remote_code: bool = False
):
    """Build ``cls`` from the manifest's config (parts given, or loaded by the manifest's names) and
    load the adapter strictly, after every check in the module docstring: a refusal changes nothing.
    ``trust_remote_code`` comes from the caller only, never from the (possibly foreign) manifest."""
    directory = Path(directory)
    for name in (MANIFEST, WEIGHTS):
        if (directory / name).exists() or (directory / name).is_symlink():
            regular_file_inside(directory, name)
    manifest = read_manifest(directory)
    config = manifest_config(manifest, str(directory / MANIFEST))
    config.lm.trust_remote_code = bool(trust_remote_code)
    state = read_weights(directory, manifest)
    listed = manifest.get("tensors")
    if listed is not None and {k: list(v.shape) for k, v in state.items()} != listed:
        raise ValueError(f"{directory}: {WEIGHTS} does not hold the tensors its manifest lists; nothing was loaded")
    model = build_for_manifest(cls, manifest, config, directory, vision_model, lm, tokenizer, preprocess, state)
    load_adapter_weights(model, state, directory)
    return model


def build_for_manifest(
    cls, manifest: dict, config, where, vision_model=None, lm=None, tokenizer=None, preprocess=None, state=None
):
    """``cls(config, parts...)`` for a validated ``manifest``: the given parts checked against it, the
    missing ones loaded by its names, the tensors the model will expect compared with ``state`` (when
    given) on a meta-device build, and the real model checked against the manifest once built."""
    where = Path(where)
    _check_given_parts(manifest, where, vision_model, lm)
    vision_model, preprocess, lm, tokenizer = _load_missing_parts(
        config, manifest, where, vision_model, preprocess, lm, tokenizer
    )
    try:
        expected = _expected_tensors(cls, config, manifest, vision_model, lm, tokenizer, preprocess)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if state is not None:
        _compare(expected, state, where)
    model = cls(config, vision_model=vision_model, lm=lm, tokenizer=tokenizer, preprocess=preprocess)
    _check_built(model, manifest)
    _adopt_token_rows(model, manifest)
    return model


def load_adapter_weights(model, state: dict[str, Tensor], where: str | Path = "adapter") -> None:
    """Copy ``state`` into ``model``; missing, unexpected or misshapen tensors raise naming them."""
    _compare({k: tuple(v.shape) for k, v in _adapter_tensors(model).items()}, state, where)
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
