"""Adapter checkpoints: fresh-process round trip through the real loading paths, strict loading, atomic writes,
YAML builder, and plugging a trained resampler into another LM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vlm.checkpoint as ckpt
from resampler.config import load_config, save_config
from vlm import (
    InjectionConfig,
    LoRAConfig,
    ResamplerConfig,
    VisionConfig,
    VisionLanguageModel,
    VLMConfig,
    load_component,
)
from vlm.testing import tiny_clip, tiny_images, tiny_lm, tiny_parts, tiny_tokenizer, tiny_vlm, tiny_vlm_config

ROOT = Path(__file__).resolve().parents[1]


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _saved_base_parts(tmp_path: Path, family: str) -> VLMConfig:
    """Write the tiny LM + tokenizer to a directory and the tower's weights to a file; return a config
    that loads them through from_pretrained / create_model_and_transforms(pretrained=path)."""
    clip, _ = tiny_clip(seed=3)
    torch.save(clip.state_dict(), tmp_path / "vision.pt")
    tok = tiny_tokenizer()
    tiny_lm(family, tok, seed=4).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    config = tiny_vlm_config(family)
    config.vision = VisionConfig(name=config.vision.name, pretrained=str(tmp_path / "vision.pt"))
    config.lm.name_or_path = str(tmp_path / "lm")
    return config


@pytest.mark.slow  # the fresh interpreter re-imports torch, open_clip, transformers and peft (~20-50 s here)
def test_save_then_load_in_a_fresh_process_gives_identical_logits(tmp_path):
    """Both injection modes, base parts loaded by path (from_pretrained / open_clip pretrained=file)."""
    images = tiny_images(3)
    jobs = {}
    for mode in ("prefix", "cross_attention"):
        folder = tmp_path / mode
        folder.mkdir()
        config = _saved_base_parts(folder, "qwen2")
        config.injection = InjectionConfig(mode=mode, every_k_layers=1, xattn_heads=2, xattn_head_dim=8)
        config = VLMConfig(
            **{k: getattr(config, k) for k in ("vision", "resampler", "projector", "lm", "lora", "injection")}
        )
        model = _perturb(VisionLanguageModel(config)).eval()
        batch = model.processor(["Caption:", "<image>a <image>b"], captions=["a red circle", "two"], num_images=[1, 2])
        torch.save({"batch": batch, "images": images}, folder / "inputs.pt")
        model.save_adapter(folder / "adapter")
        jobs[mode] = model(images=images, **batch).logits
    script = textwrap.dedent(
        f"""
        import torch
        from pathlib import Path
        from vlm.testing import register_tiny_clip
        from vlm import VisionLanguageModel
        register_tiny_clip()
        torch.set_num_threads(1)
        for mode in ("prefix", "cross_attention"):
            folder = Path({str(tmp_path)!r}) / mode
            model = VisionLanguageModel.load_adapter(folder / "adapter").eval()
            inputs = torch.load(folder / "inputs.pt")
            with torch.no_grad():
                logits = model(images=inputs["images"], **inputs["batch"]).logits
            torch.save(logits, folder / "logits.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, timeout=600)
    for mode, want in jobs.items():
        assert torch.equal(torch.load(tmp_path / mode / "logits.pt"), want), mode


def test_manifest_and_files(tmp_path):
    model = tiny_vlm("gpt2")
    model.save_adapter(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["lm"]["model_type"] == "gpt2" and manifest["lm"]["hidden_size"] == 32
    assert manifest["lm"]["vocab_size"] == manifest["lm"]["base_vocab_size"] + 1 == len(model.tokenizer)
    assert manifest["vision"]["name"] == model.config.vision.name and manifest["vision"]["width"] == 48
    assert manifest["config"]["resampler"]["num_latents"] == 8 and manifest["library"]["version"]
    names = set(manifest["tensors"])
    assert any(n.startswith("resampler.") for n in names) and any(n.startswith("projector.") for n in names)
    assert any("lora_" in n for n in names) and "new_token_rows.input" in names
    # only adapter tensors: no frozen LM or tower weight is saved
    assert all(n.startswith(("resampler.", "projector.", "new_token_rows.")) or "lora_" in n for n in names)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _perturb(tiny_vlm("gpt2"))
    target = tmp_path / "a"
    model.save_adapter(target)
    before = (target / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        model.projector[0].weight.add_(1.0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vlm.checkpoint.write_bytes", broken)  # the one call that writes the files
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(target)
    assert (target / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp leftovers
    monkeypatch.undo()
    model.save_adapter(target)  # overwriting an existing checkpoint works
    assert (target / "adapter.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_strict_load_names_what_differs(tmp_path):
    tiny_vlm("llama").save_adapter(tmp_path / "a")
    clip, _ = tiny_clip()
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"hidden_size=32.*this LM has hidden_size=64"):
        VisionLanguageModel.load_adapter(tmp_path / "a", clip, tiny_lm("llama", tok, hidden_size=64), tok)
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"model_type='llama'.*this LM has model_type='mistral'"):
        VisionLanguageModel.load_adapter(tmp_path / "a", clip, tiny_lm("mistral", tok), tok)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(ValueError, match=r"vocab_size=321.*this LM has vocab_size=322"):
        VisionLanguageModel.load_adapter(tmp_path / "a", clip, tiny_lm("llama", tok), tok)
    # the strict copy into a built model names missing, unexpected and misshapen tensors
    vision, _, lm, tok = tiny_parts("llama")
    model = VisionLanguageModel.from_parts(vision, lm, tok, tiny_vlm_config("llama"))
    state = ckpt.read_weights(tmp_path / "a")
    missing = dict(state)
    missing.pop(next(k for k in state if k.startswith("resampler.")))
    with pytest.raises(ValueError, match=r"missing \['resampler\."):
        ckpt.load_adapter_weights(model, missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        ckpt.load_adapter_weights(model, {**state, "extra.weight": torch.zeros(1)})
    name = next(k for k in state if k.startswith("projector."))
    with pytest.raises(ValueError, match=rf"{name} has shape \(1,\), this model expects"):
        ckpt.load_adapter_weights(model, {**state, name: torch.zeros(1)})
    # a tampered file whose tensors no longer match its manifest
    from safetensors.torch import save_file

    save_file(missing, tmp_path / "a" / "adapter.safetensors")
    vision, _, lm, tok = tiny_parts("llama")
    with pytest.raises(ValueError, match="adapter.safetensors is .* bytes, its record says"):  # its digest
        VisionLanguageModel.load_adapter(tmp_path / "a", vision, lm, tok)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        VisionLanguageModel.load_adapter(tmp_path, vision, lm, tok)


def test_yaml_config_builds_the_same_model(tmp_path):
    config = _saved_base_parts(tmp_path, "llama")
    save_config(config, tmp_path / "vlm.yaml")
    assert load_config(VLMConfig, tmp_path / "vlm.yaml") == config
    overrides = ["resampler.num_latents=4", "lora.r=2", "injection.mode=cross_attention"]
    loaded = load_config(VLMConfig, tmp_path / "vlm.yaml", overrides)
    assert loaded.tokens_per_image == 1 and loaded.resampler.num_latents == 4
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tmp_path / "vlm.yaml")
    assert model.config == config and model.model_type == "llama"
    assert len(model.generate(tiny_images(1), "Caption:", max_new_tokens=2)) == 1


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="resampler.num_latents must be positive"):
        ResamplerConfig(num_latents=0)
    with pytest.raises(ValueError, match="resampler.num_kv_heads=3 must divide resampler.heads=8"):
        ResamplerConfig(num_kv_heads=3)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="injection.every_k_layers must be positive"):
        InjectionConfig(every_k_layers=0)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['lm.hidden'\]"):
        load_config(VLMConfig, None, ["lm.hidden=12"])
    with pytest.raises(ValueError, match=r"injection.mode: must be one of \['prefix', 'cross_attention'\]"):
        load_config(VLMConfig, None, ["injection.mode=late"])
    config = VLMConfig()
    assert config.tokens_per_image == 64
    config.injection.mode = "cross_attention"  # derived values follow edits of the parts
    assert config.tokens_per_image == 1


def test_trained_resampler_plugs_into_another_lm(tmp_path):
    """Train on llama, save; attach the resampler to gpt2 with a fresh head: only head + LoRA train."""
    source = _perturb(tiny_vlm("llama"))
    source.save_adapter(tmp_path / "a")
    resampler_state = load_component(tmp_path / "a", "resampler.")
    vision, preprocess, lm, tok = tiny_parts("gpt2")
    config = tiny_vlm_config("gpt2", resampler=ResamplerConfig(**{**vars(source.config.resampler), "trainable": False}))
    target = VisionLanguageModel.from_parts(vision, lm, tok, config, preprocess=preprocess)
    target.resampler.load_state_dict(resampler_state)
    for name, param in source.resampler.state_dict().items():
        assert torch.equal(target.resampler.state_dict()[name], param)
    trainable = {n.split(".")[0] for n, p in target.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "lm"}
    batch = target.processor(["Caption:"], captions=["a red circle"], num_images=1)
    target(images=tiny_images(1), **batch).loss.backward()
    assert all(p.grad is None for p in target.resampler.parameters())
    assert target.projector[0].weight.grad is not None
    assert ckpt.adapter_state_dict(target).keys() >= {f"resampler.{k}" for k in resampler_state}


def test_lm_dtype_from_config(tmp_path):
    config = _saved_base_parts(tmp_path, "llama")
    config.lm.dtype = "bfloat16"
    model = VisionLanguageModel(config)
    dtypes = {("lora_" in n, p.dtype) for n, p in model.language_model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # peft keeps adapters in fp32
    assert {p.dtype for p in model.resampler.parameters()} == {torch.float32}
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    assert torch.isfinite(model(images=tiny_images(1), **batch).loss)
