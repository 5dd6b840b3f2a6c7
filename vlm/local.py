"""Bring your own weights: local paths told apart from hub ids, and custom open_clip towers recorded.

A name such as ``HuggingFaceTB/SmolLM2-135M`` (``name`` or ``owner/name``) is a hub id; anything that
can only be a path (absolute, ``./``/``../``/``~``, more than one ``/``, or an existing entry) is local,
and a local path that does not exist is a FileNotFoundError naming the config field, before
transformers would report it as a malformed repo id. open_clip's ``local-dir:<folder>`` towers (a
folder holding ``open_clip_config.json`` and the weights) are checked the same way.

An open_clip tower named by a config registered with ``open_clip.add_model_config`` (not one open_clip
ships) exists only in the process that registered it. The adapter manifest therefore records the
tower's model config (`open_clip_model_config`), and loading an adapter registers it again from the
manifest when this process does not know the name (`register_open_clip_config`); a process that knows
the name with another config is refused, since the weights would not fit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .io import atomic_write

__all__ = [
    "is_local_path",
    "check_local_path",
    "check_vision_paths",
    "open_clip_model_config",
    "register_open_clip_config",
]

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_local_path(value: str | os.PathLike | None) -> bool:
    """Whether ``value`` can only be a file-system path (never a hub repo id)."""
    if value is None:
        return False
    text = os.fspath(value)
    if not text:
        return False
    if text in (".", "..") or text.startswith(("/", "./", "../", "~", "\\")) or (os.sep != "/" and os.sep in text):
        return True
    return text.count("/") > 1 or Path(text).exists()


def check_local_path(value: str | os.PathLike | None, field: str, kind: str = "directory") -> None:
    """A local ``value`` must exist (``kind``: ``directory``, ``file`` or ``any``); hub ids pass unchecked."""
    if not is_local_path(value):
        return
    path = Path(os.fspath(value)).expanduser()
    ok = {"directory": path.is_dir, "file": path.is_file, "any": path.exists}[kind]()
    if not ok:
        what = "no such directory" if kind == "directory" else "no such file" if kind == "file" else "no such path"
        hint = f" ({path} is a file)" if kind == "directory" and path.is_file() else ""
        raise FileNotFoundError(f"{field}={os.fspath(value)!r}: {what}{hint}")


def check_vision_paths(config) -> None:
    """``vision.name`` / ``vision.pretrained`` of a `VisionConfig` that point at local files must exist."""
    if config.kind != "open_clip":
        check_local_path(config.name, "vision.name")
        return
    if config.name.startswith("local-dir:"):
        check_local_path(config.name[len("local-dir:") :] or ".", "vision.name (local-dir:)")
    pretrained = config.pretrained
    if pretrained and (is_local_path(pretrained) or pretrained.endswith(_WEIGHT_SUFFIXES)):
        check_local_path(pretrained if is_local_path(pretrained) else f"./{pretrained}", "vision.pretrained", "file")


def open_clip_model_config(name: str) -> dict[str, Any] | None:
    """The model config open_clip holds for ``name`` (shipped or registered), or None (hf-hub:, local-dir:)."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return None
    config = open_clip.get_model_config(name)
    return json.loads(json.dumps(config)) if config is not None else None  # a plain JSON copy


def register_open_clip_config(name: str, config: dict[str, Any] | None, where: str = "adapter") -> None:
    """Make ``name`` known to open_clip with ``config`` (from a manifest) unless it already is, with the same."""
    import open_clip

    if config is None or name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip_model_config(name)
    if known is not None:
        if known != config:
            raise ValueError(
                f"{where}: the open_clip model {name!r} registered in this process has another config than the one "
                "the adapter was trained with; register the adapter's config (its manifest's vision.open_clip_config) "
                "or rename your own"
            )
        return
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{where}: open_clip model name {name!r} cannot be registered (it is a path)")
    folder = Path(tempfile.mkdtemp(prefix="pvlm_open_clip_"))
    open_clip.add_model_config(atomic_write(folder / f"{name}.json", json.dumps(config)))
