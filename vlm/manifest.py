"""The adapter manifest (``manifest.json``): what it records, and the checks a manifest read from disk
passes before anything is built from it.

A manifest may come from a stranger, so `read_manifest` trusts nothing: the file must be a regular
file inside the adapter directory (no symlink), at most ``MAX_MANIFEST_BYTES``, UTF-8, JSON nested at
most ``MAX_DEPTH`` deep, and of the shape below (types, required keys, non-negative bounded ints);
``config`` is then parsed by `VLMConfig`'s own typed rules. Any failure is a ValueError naming the
file and the field; nothing is built and no memory is allocated by the manifest's numbers.

    format_version  1
    library         {name, version}
    vision          {name, pretrained, width, num_patches}
    lm              {name_or_path, revision, model_type, hidden_size, vocab_size, base_vocab_size, commit_hash}
    tokenizer       {size, image_token, image_token_id, new_token_ids}
    config          the full VLMConfig
    tensors         {name: shape} of adapter.safetensors
    files           {file name: {sha256, size}} (`vlm.integrity`; absent in adapters saved before it)
    step            the training step the adapter was saved at (absent when not saved by training)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resampler.config import from_dict

from .config import VLMConfig
from .integrity import check_record, read_verified

__all__ = ["FORMAT_VERSION", "MANIFEST", "build_manifest", "read_manifest", "validate_manifest", "manifest_config"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32
_MAX_INT = 1 << 40
_MAX_STR = 4096

_OPT_STR = (str, None)
_SCHEMA: dict[str, Any] = {
    "format_version": int,
    "?library": {"name": str, "version": str},
    "vision": {
        "?kind": str,
        "name": str,
        "pretrained": _OPT_STR,
        "width": int,
        "num_patches": int,
        "?open_clip_config": (dict, None),
    },
    "lm": {
        "name_or_path": str,
        "?revision": _OPT_STR,
        "model_type": str,
        "hidden_size": int,
        "vocab_size": int,
        "base_vocab_size": int,
        "?commit_hash": _OPT_STR,
    },
    "tokenizer": {"size": int, "image_token": str, "image_token_id": int, "new_token_ids": [int]},
    "?connector": dict,
    "config": dict,
    "?tensors": {"*": [int]},
    "?files": dict,
    "?step": (int, None),
}


def build_manifest(model, tensors: dict, files: dict[str, dict] | None = None, step: int | None = None) -> dict:
    """The manifest of ``model``'s adapter: its parts, vocabulary, config, tensor shapes and file records."""
    import resampler
    from resampler.config import to_dict

    from .local import open_clip_model_config

    manifest = {
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
            "commit_hash": getattr(model.lm_config, "_commit_hash", None),
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
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    if files is not None:
        manifest["files"] = files
    if step is not None:
        manifest["step"] = int(step)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """``directory/manifest.json`` read and checked as described in the module docstring."""
    path = Path(directory) / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{directory} is not an adapter checkpoint: {MANIFEST} is missing")
    data = read_verified(directory, MANIFEST, None, max_size=MAX_MANIFEST_BYTES)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a manifest") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    return validate_manifest(manifest, str(path))


def validate_manifest(manifest: Any, where: str) -> dict:
    """``manifest`` (parsed JSON) checked whole: depth, schema, format version, file records."""
    _check_depth(manifest, where)
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: a manifest is a JSON object, got a {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"{where}: format_version {version!r}, this library reads {FORMAT_VERSION}")
    _check(manifest, _SCHEMA, where)
    if "files" in manifest:
        check_record(manifest["files"], f"{where}: files")
    return manifest


def manifest_config(manifest: dict, where: str) -> VLMConfig:
    """The manifest's ``config`` as a `VLMConfig` (its typed rules: unknown fields, types, ranges)."""
    try:
        return from_dict(VLMConfig, manifest["config"], "config")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _check_depth(value: Any, where: str) -> None:
    """Iteratively (no recursion to exhaust): no container nested deeper than ``MAX_DEPTH``."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels; not a manifest")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _check(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, tuple):  # (type, None): optional value
        if value is None:
            return
        spec = spec[0]
    if spec is int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_INT:
            raise ValueError(f"{where}: must be an integer in [0, 2^40), got {_short(value)}")
    elif spec is str:
        if not isinstance(value, str) or len(value) > _MAX_STR:
            raise ValueError(f"{where}: must be a string of at most {_MAX_STR} characters, got {_short(value)}")
    elif spec is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be a mapping, got {_short(value)}")
    elif isinstance(spec, list):
        if not isinstance(value, list) or len(value) > 1 << 16:
            raise ValueError(f"{where}: must be a list, got {_short(value)}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be a mapping, got {_short(value)}")
        if "*" in spec:
            for key, item in value.items():
                _check(item, spec["*"], f"{where}.{key}")
            return
        for key, sub in spec.items():
            name, optional = key.lstrip("?"), key.startswith("?")
            if name not in value:
                if not optional:
                    raise ValueError(f"{where}: {name!r} is missing")
                continue
            _check(value[name], sub, f"{where}.{name}" if not where.endswith(".json") else f"{where}: {name}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
