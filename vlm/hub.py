"""Hugging Face conventions for a trained VLM: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
and ``merge_and_export`` for serving.

`save_pretrained` writes the adapter (`vlm.checkpoint`'s tensors and manifest) in the Hub's layout:

    directory/
      config.json              the adapter manifest + model_type "perceiver-vlm" (base parts by name, full config)
      connector.safetensors    resampler, projection, gated cross-attention blocks, added token rows
      generation_config.json   the model's `generation_config`, which `generate` honours
      lora/                    peft's own format: PeftModel.from_pretrained(base_lm, "directory/lora") loads it
        adapter_config.json, adapter_model.safetensors

`from_pretrained` takes that directory or a Hub repo id (fetched with ``huggingface_hub.snapshot_download``)
and the base parts in memory or by the names the config records, exactly as `load_adapter` does; the
LoRA tensors go through peft's ``set_peft_model_state_dict`` and every tensor is checked against the model
(nothing missing, nothing unexpected, same shapes). `push_to_hub` is `save_pretrained` into a temporary
folder plus a model card, uploaded with ``HfApi.upload_folder``.

`merge_and_export` writes a plain transformers LM directory for serving: LoRA merged into the weights
(peft's ``merge_and_unload`` on a copy of the LM, so the model in memory keeps its adapter and twice the
LM's memory is needed while writing), the added token rows included, the tokenizer beside it; the
connector and the VLM config go to its ``vlm/`` subfolder (LoRA off). ``AutoModelForCausalLM.
from_pretrained(directory)`` loads the LM alone; ``VisionLanguageModel.from_pretrained(directory)`` the VLM.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from torch import Tensor

from .checkpoint import adapter_state_dict, build_for_manifest, load_adapter_weights
from .io import atomic_directory
from .language import is_quantized, unwrap_lm
from .local import check_local_path, is_local_path
from .manifest import build_manifest, manifest_config, validate_manifest

__all__ = ["MODEL_TYPE", "save_pretrained", "from_pretrained", "push_to_hub", "merge_and_export"]

MODEL_TYPE = "perceiver-vlm"
CONFIG, CONNECTOR, GENERATION, LORA_DIR, EXPORT_DIR = (
    "config.json",
    "connector.safetensors",
    "generation_config.json",
    "lora",
    "vlm",
)


def _is_lora(name: str) -> bool:
    return name.startswith("lm.") and "lora_" in name


def _hub_config(model, tensors: dict[str, Tensor], **extra) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["VisionLanguageModel"],
        **build_manifest(model, tensors),
        **extra,
    }


def _write(tmp: Path, model, connector: dict[str, Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    save_file(connector, str(tmp / CONNECTOR), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(tmp)


def save_pretrained(model, directory: str | Path) -> Path:
    """Write ``model``'s adapter to ``directory`` in the layout of the module docstring, atomically."""
    state = adapter_state_dict(model)
    connector = {k: v for k, v in state.items() if not _is_lora(k)}
    lora = any(_is_lora(k) for k in state)
    config = _hub_config(model, connector, lora_subfolder=LORA_DIR if lora else None)
    with atomic_directory(directory) as tmp:
        _write(tmp, model, connector, config)
        if lora:
            folder = tmp / LORA_DIR
            model.lm.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
            (folder / "README.md").unlink(missing_ok=True)  # peft's empty card; push_to_hub writes one
            peft_config = json.loads((folder / "adapter_config.json").read_text())
            peft_config["base_model_name_or_path"] = model.config.lm.name_or_path  # the base, for its readers
            (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return Path(directory)


def _resolve(name_or_path: str | Path, revision: str | None, token) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    check_local_path(str(name_or_path), "from_pretrained")
    if is_local_path(str(name_or_path)):  # an existing file, not a directory
        raise NotADirectoryError(f"from_pretrained: {name_or_path} is not a directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(name_or_path), revision=revision, token=token))


def _read_config(directory: Path) -> tuple[dict, Path]:
    """(the VLM config.json, the directory it is in): an adapter directory, or a merged export's ``vlm/``."""
    for where in (directory, directory / EXPORT_DIR):
        path = where / CONFIG
        if path.is_file():
            config = json.loads(path.read_text())
            if isinstance(config, dict) and config.get("model_type") == MODEL_TYPE:
                return validate_manifest(config, str(path)), where
    raise ValueError(
        f"{directory} holds no perceiver-vlm model: no {CONFIG} with model_type {MODEL_TYPE!r} in it or in "
        f"{EXPORT_DIR}/ (write one with save_pretrained or merge_and_export)"
    )


def from_pretrained(
    cls,
    name_or_path: str | Path,
    *,
    vision_model=None,
    lm=None,
    tokenizer=None,
    preprocess=None,
    revision: str | None = None,
    token=None,
    trust_remote_code: bool = False,
):
    """A ``cls`` from a `save_pretrained` / `merge_and_export` directory or Hub repo id; see the module docstring."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    root = _resolve(name_or_path, revision, token)
    manifest, where = _read_config(root)
    config = manifest_config(manifest, str(where / CONFIG))
    config.lm.trust_remote_code = bool(trust_remote_code)
    if manifest.get("merged"):  # the LM (LoRA merged) and its tokenizer are the export directory itself
        config.lm.name_or_path = str(root)
    connector = load_file(str(where / CONNECTOR))
    if {k: list(v.shape) for k, v in connector.items()} != manifest.get("tensors"):
        raise ValueError(f"{where}: {CONNECTOR} does not hold the tensors its {CONFIG} lists; nothing was loaded")
    model = build_for_manifest(cls, manifest, config, where, vision_model, lm, tokenizer, preprocess)
    state = dict(connector)
    if manifest.get("lora_subfolder"):
        state.update(_load_lora(model, where / manifest["lora_subfolder"]))
    load_adapter_weights(model, state, where)
    if (where / GENERATION).is_file():
        model.generation_config = GenerationConfig.from_pretrained(where)
    return model


def _load_lora(model, folder: Path) -> dict[str, Tensor]:
    """peft's adapter file into ``model.lm`` (peft's key mapping); returns the LoRA tensors by our names."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: adapter_model.safetensors (peft's LoRA weights) is missing")
    if not hasattr(model.lm, "peft_config"):
        raise ValueError(f"{folder}: the checkpoint has LoRA weights but the config builds no LoRA (lora.enabled)")
    result = set_peft_model_state_dict(model.lm, load_file(str(weights)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{folder}: LoRA tensors do not match this model: unexpected {list(result.unexpected_keys)[:5]}, "
            f"missing {missing[:5]}"
        )
    return {k: v for k, v in adapter_state_dict(model).items() if _is_lora(k)}


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    commit_message: str = "Upload perceiver-vlm adapter",
):
    """`save_pretrained` into a temporary folder with a model card, then ``HfApi.upload_folder`` to ``repo_id``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="pvlm_push_") as tmp:
        folder = save_pretrained(model, Path(tmp) / "model")
        (folder / "README.md").write_text(_model_card(model, repo_id))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
        )


def _model_card(model, repo_id: str) -> str:
    cfg = model.config
    return (
        f"---\nlibrary_name: perceiver-vlm\nbase_model: {cfg.lm.name_or_path}\ntags: [image-to-text, perceiver-resampler]\n"
        f"---\n# {repo_id}\n\nA Perceiver Resampler adapter (`perceiver-vlm`): vision tower `{cfg.vision.name}` "
        f"({cfg.vision.pretrained or cfg.vision.kind}) -> resampler ({cfg.resampler.num_latents} latents) -> "
        f"{cfg.projector.kind} projection -> `{cfg.lm.name_or_path}` ({cfg.injection.mode} injection"
        f"{', LoRA in lora/ (peft format)' if cfg.lora.enabled else ''}).\n\n```python\nfrom vlm import "
        f'VisionLanguageModel\n\nmodel = VisionLanguageModel.from_pretrained("{repo_id}")\n'
        "print(model.caption(images))\n```\n"
    )


def merge_and_export(model, directory: str | Path) -> Path:
    """Write a plain transformers LM directory (LoRA merged) plus ``vlm/`` (connector + config); see above."""
    hf = unwrap_lm(model.lm)
    if is_quantized(hf):
        raise ValueError(
            "merge_and_export: the LM is quantized (bitsandbytes); merging LoRA into 4/8-bit weights loses precision. "
            "Load the base LM in float (lm.quantization=none), from_pretrained this adapter onto it, then export"
        )
    lm = copy.deepcopy(model.lm)
    merged = lm.merge_and_unload() if hasattr(lm, "merge_and_unload") else lm
    # the connector alone: LoRA is merged and the added token rows are part of the exported embeddings
    connector = {
        k: v for k, v in adapter_state_dict(model).items() if k.startswith(("resampler.", "projector.", "xattn."))
    }
    manifest = _hub_config(model, connector, merged=True, lora_subfolder=None)
    manifest["config"]["lora"]["enabled"] = False
    vocab = manifest["lm"]["vocab_size"]
    manifest["lm"]["base_vocab_size"], manifest["tokenizer"]["new_token_ids"] = vocab, []
    with atomic_directory(directory) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        model.tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_DIR).mkdir()
        _write(tmp / EXPORT_DIR, model, connector, manifest)
    return Path(directory)
