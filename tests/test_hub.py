"""Hugging Face conventions: save_pretrained -> a fresh process -> from_pretrained gives the same logits;
peft loads the LoRA subfolder; the merged export is a plain transformers LM with the same logits;
push_to_hub uploads exactly the save_pretrained folder; generation_config is honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlm import VisionLanguageModel
from vlm.testing import tiny_images, tiny_lm, tiny_parts, tiny_tokenizer, tiny_vlm_config

ROOT = Path(__file__).resolve().parents[1]


def _trained(model: VisionLanguageModel, seed: int = 3) -> VisionLanguageModel:
    """Move every trainable tensor off its init (LoRA B starts at zero: a merge of it would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _batch(model):
    return model.processor(
        ["Caption:", "<image>left, <image>right:"], captions=["a red circle", "two"], num_images=[1, 2]
    )


@pytest.fixture(scope="module")
def on_disk(tiny_base_on_disk):
    """A trained VLM whose base parts are files (clip weights, an LM directory), as a user's would be."""
    import copy

    root, config = tiny_base_on_disk
    clip_model, preprocess, lm, tokenizer = tiny_parts("llama")
    config = copy.deepcopy(config)
    model = _trained(VisionLanguageModel.from_parts(clip_model, lm, tokenizer, config, preprocess=preprocess))
    return root, model


def test_save_pretrained_layout(on_disk, tmp_path):
    _, model = on_disk
    out = model.save_pretrained(tmp_path / "vlm")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "connector.safetensors",
        "generation_config.json",
        "lora",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "perceiver-vlm" and config["lora_subfolder"] == "lora"
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        on_disk[0] / "lm"
    )
    assert not any("lora_" in k for k in config["tensors"])


def test_save_pretrained_then_a_fresh_process_from_pretrained_gives_identical_logits(on_disk, tmp_path):
    _, model = on_disk
    model.save_pretrained(tmp_path / "vlm")
    images = tiny_images(3)
    with torch.no_grad():
        want = model(images=images, **_batch(model)).logits
    script = textwrap.dedent(
        f"""
        import torch
        from vlm import VisionLanguageModel
        from vlm.testing import tiny_images
        # nothing registered here: the tiny open_clip config comes from the saved config.json
        model = VisionLanguageModel.from_pretrained({str(tmp_path / "vlm")!r}).eval()
        batch = model.processor(["Caption:", "<image>left, <image>right:"], captions=["a red circle", "two"],
                                num_images=[1, 2])
        with torch.no_grad():
            torch.save(model(images=tiny_images(3), **batch).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def test_peft_loads_the_lora_subfolder_and_gives_the_same_lm_logits(on_disk, tmp_path):
    from peft import PeftModel

    from vlm.language import add_token_rows

    _, model = on_disk
    model.save_pretrained(tmp_path / "vlm")
    ids = model.tokenizer(["a red circle on the left", "two shapes"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model.language_model(**ids).logits  # (B, L, vocab + added rows)
        base = tiny_lm("llama", tiny_tokenizer())  # the base LM as published: no added rows
        vocab = base.get_input_embeddings().num_embeddings
        plain = PeftModel.from_pretrained(base, str(tmp_path / "vlm" / "lora")).eval()
        torch.testing.assert_close(plain(**ids).logits, want[..., :vocab], atol=1e-6, rtol=1e-6)
        grown = tiny_lm("llama", tiny_tokenizer())
        add_token_rows(grown, len(model.tokenizer))  # the VLM's added rows (mean init), as the VLM does
        peft_lm = PeftModel.from_pretrained(grown, str(tmp_path / "vlm" / "lora")).eval()
        assert torch.equal(peft_lm(**ids).logits, want)


@pytest.mark.parametrize("mode", ["prefix", "cross_attention"])
def test_merged_export_is_a_plain_lm_with_the_same_logits(mode, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vlm import InjectionConfig

    clip_model, preprocess, lm, tokenizer = tiny_parts("llama")
    injection = InjectionConfig(mode=mode, every_k_layers=1, xattn_heads=2, xattn_head_dim=8)
    config = tiny_vlm_config("llama", injection=injection)
    model = _trained(VisionLanguageModel.from_parts(clip_model, lm, tokenizer, config, preprocess=preprocess))
    out = model.merge_and_export(tmp_path / "export")

    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers alone, no peft, no vlm
    ids = model.tokenizer(["a red circle on the left"], return_tensors="pt")
    images = tiny_images(3)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, model.language_model(**ids).logits, atol=1e-5, rtol=1e-5)
        again = VisionLanguageModel.from_pretrained(out, vision_model=tiny_parts("llama")[0], preprocess=preprocess)
        assert not again.config.lora.enabled
        got = again.eval()(images=images, **_batch(again)).logits
        torch.testing.assert_close(got, model(images=images, **_batch(model)).logits, atol=1e-5, rtol=1e-5)


def test_push_to_hub_uploads_the_save_pretrained_folder(on_disk, monkeypatch):
    from huggingface_hub import HfApi

    _, model = on_disk
    seen = {}

    def create_repo(self, repo_id, **kwargs):
        seen["created"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # stands in for the network call
        folder = Path(folder_path)
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["card"] = (folder / "README.md").read_text()
        seen["model"] = VisionLanguageModel.from_pretrained(folder).eval()
        seen["repo"] = repo_id
        return "https://hub.example/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert model.push_to_hub("me/tiny-vlm", private=True) == "https://hub.example/commit/1"
    assert seen["repo"] == "me/tiny-vlm" and seen["created"][1]["private"] is True
    assert seen["files"] == ["README.md", "config.json", "connector.safetensors", "generation_config.json", "lora"]
    assert 'VisionLanguageModel.from_pretrained("me/tiny-vlm")' in seen["card"]
    images = tiny_images(3)
    with torch.no_grad():
        assert torch.equal(
            seen["model"](images=images, **_batch(model)).logits, model(images=images, **_batch(model)).logits
        )


def test_from_pretrained_fetches_a_hub_id_with_snapshot_download(on_disk, tmp_path, monkeypatch):
    import huggingface_hub

    _, model = on_disk
    folder = model.save_pretrained(tmp_path / "cache")
    calls = []

    def snapshot_download(repo_id, revision=None, token=None):
        calls.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    VisionLanguageModel.from_pretrained("me/tiny-vlm", revision="v1")
    assert calls == [("me/tiny-vlm", "v1")]


def test_from_pretrained_of_a_missing_local_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        VisionLanguageModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no perceiver-vlm model"):
        VisionLanguageModel.from_pretrained(tmp_path / "empty")


def test_generation_config_is_honoured_and_saved(on_disk, tmp_path):
    _, model = on_disk
    images = tiny_images(2)
    default = model.generate_ids(**model.processor(["<image>Caption:"] * 2, num_images=1, padding_side="left"),
                                 images=images)  # fmt: skip
    model.generation_config.max_new_tokens = 2
    model.generation_config.num_beams = 2
    try:
        texts = model.generate(images, "Caption:")
        assert texts == model.generate(images, "Caption:", max_new_tokens=2, num_beams=2)
        ids = model.generate_ids(**model.processor(["<image>Caption:"] * 2, num_images=1, padding_side="left"),
                                 images=images)  # fmt: skip
        assert ids.shape[1] <= 2 < default.shape[1]
        again = VisionLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "vlm"))
        assert again.generation_config.num_beams == 2 and again.eval().generate(images, "Caption:") == texts
    finally:
        model.generation_config.max_new_tokens = None
        model.generation_config.num_beams = 1
