"""Adapters from strangers (issue 20): symlinks out of the directory, malformed manifests, sizes that
would allocate gigabytes, NaN weights, and refusals that must leave the caller's LM, embeddings and
tokenizer bit-identical. Plus issue 15's train-then-load in one process with the same tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm.integrity import digest
from vlm.model import VisionLanguageModel
from vlm.testing import tiny_clip, tiny_images, tiny_lm, tiny_parts, tiny_tokenizer, tiny_vlm, tiny_vlm_config

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_vlm("llama")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, model.save_adapter(tmp_path_factory.mktemp("adapter") / "adapter")


def _copy(saved, tmp_path) -> Path:
    return shutil.copytree(saved[1], tmp_path / "adapter")


def _manifest(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _write_manifest(directory, manifest) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_weights(directory, state) -> None:
    """Replace the weights and record them consistently (digest and tensor list), as a stranger can."""
    save_file(state, str(directory / "adapter.safetensors"))
    manifest = _manifest(directory)
    manifest["files"]["adapter.safetensors"] = digest((directory / "adapter.safetensors").read_bytes())
    manifest["tensors"] = {k: list(v.shape) for k, v in state.items()}
    _write_manifest(directory, manifest)


def _caller_parts():
    vision, preprocess = tiny_clip()
    tokenizer = tiny_tokenizer()
    return vision, preprocess, tiny_lm("llama", tokenizer), tokenizer


def _snapshot(lm, tokenizer) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in lm.state_dict().items()},
        "rows": lm.get_input_embeddings().weight.shape[0],
        "tokens": len(tokenizer),
        "vocab": dict(tokenizer.get_vocab()),
        "type": type(lm),
    }


def _unchanged(before: dict, lm, tokenizer) -> None:
    after = _snapshot(lm, tokenizer)
    assert after["type"] is before["type"]  # not wrapped by peft
    assert after["state"].keys() == before["state"].keys()  # no LoRA layers injected
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert (after["rows"], after["tokens"], after["vocab"]) == (before["rows"], before["tokens"], before["vocab"])


def _load(directory, vision, preprocess, lm, tokenizer):
    return VisionLanguageModel.load_adapter(directory, vision, lm, tokenizer, preprocess=preprocess)


# ----------------------------------------------------------------------------------------------
# Files must be regular files inside the directory


@pytest.mark.parametrize("victim", ["adapter.safetensors", "manifest.json"])
def test_a_symlink_out_of_the_adapter_directory_is_refused(saved, tmp_path, victim):
    directory = _copy(saved, tmp_path)
    outside = tmp_path / "outside" / victim
    outside.parent.mkdir()
    shutil.move(directory / victim, outside)  # the very same bytes, reached through a link
    (directory / victim).symlink_to(outside)
    vision, preprocess, lm, tokenizer = _caller_parts()
    before = _snapshot(lm, tokenizer)
    with pytest.raises(ValueError, match=rf"{victim} is a symlink"):
        _load(directory, vision, preprocess, lm, tokenizer)
    _unchanged(before, lm, tokenizer)


def test_pvlm_caption_refuses_a_symlinked_adapter_too(saved, tmp_path, capsys):
    from vlm.cli import main_caption

    directory = _copy(saved, tmp_path)
    (tmp_path / "elsewhere.safetensors").write_bytes((directory / "adapter.safetensors").read_bytes())
    (directory / "adapter.safetensors").unlink()
    (directory / "adapter.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    tiny_images(1)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(SystemExit) as stop:
        main_caption([f"output_dir={tmp_path / 'run'}", "--adapter", str(directory), "--images", str(image)])
    assert stop.value.code == 1
    assert "adapter.safetensors is a symlink" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The manifest is validated whole, with clear errors


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("drop_lm", r"manifest.json: 'lm' is missing"),
        ("drop_tokenizer", r"manifest.json: 'tokenizer' is missing"),
        ("list", r"a manifest is a JSON object, got a list"),
        ("deep", r"nested too deeply|nested deeper than"),
        ("deep_config", r"nested deeper than 32 levels"),
        ("latin1", r"manifest.json is not UTF-8"),
        ("lm_not_mapping", r"manifest.json: lm: must be a mapping"),
        ("width_negative", r"manifest.json: vision.width: must be an integer"),
        ("width_float", r"manifest.json: vision.width: must be an integer"),
        ("ids_strings", r"manifest.json: tokenizer.new_token_ids\[0\]: must be an integer"),
        ("bad_record", r"the record of 'adapter.safetensors' must be"),
        ("config_unknown", r"unknown config field\(s\) \['config.lm.evil'\]"),
        ("config_type", r"config.resampler.num_latents: expected an int"),
    ],
)
def test_a_malformed_manifest_is_a_clear_value_error_and_changes_nothing(saved, tmp_path, content, pattern):
    directory = _copy(saved, tmp_path)
    manifest = _manifest(directory)
    path = directory / "manifest.json"
    if content == "drop_lm":
        del manifest["lm"]
    elif content == "drop_tokenizer":
        del manifest["tokenizer"]
    elif content == "lm_not_mapping":
        manifest["lm"] = "HuggingFaceTB/SmolLM2-135M"
    elif content == "width_negative":
        manifest["vision"]["width"] = -48
    elif content == "width_float":
        manifest["vision"]["width"] = 48.0
    elif content == "ids_strings":
        manifest["tokenizer"]["new_token_ids"] = ["320"]
    elif content == "bad_record":
        manifest["files"]["adapter.safetensors"] = {"sha256": "x", "size": 1}
    elif content == "config_unknown":
        manifest["config"]["lm"]["evil"] = True
    elif content == "config_type":
        manifest["config"]["resampler"]["num_latents"] = "8"
    elif content == "deep_config":
        manifest["config"]["lm"]["name_or_path"] = json.loads(_deep(100))
    _write_manifest(directory, manifest)
    if content == "list":
        path.write_text("[1, 2, 3]")
    elif content == "deep":
        path.write_text(_deep(200_000))
    elif content == "latin1":
        path.write_bytes(json.dumps(manifest).replace("llama", "llam\u00e9").encode("latin-1"))
    vision, preprocess, lm, tokenizer = _caller_parts()
    before = _snapshot(lm, tokenizer)
    with pytest.raises(ValueError, match=pattern) as err:
        _load(directory, vision, preprocess, lm, tokenizer)
    assert type(err.value).__name__ in ("ValueError", "IntegrityError")  # never KeyError/RecursionError/...
    _unchanged(before, lm, tokenizer)


def test_an_oversized_manifest_is_refused_before_it_is_parsed(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    with open(directory / "manifest.json", "ab") as fh:
        fh.write(b" " * (17 << 20))
    with pytest.raises(ValueError, match="manifest.json is .* bytes, more than the 16777216"):
        _load(directory, *_caller_parts())


SIZE_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    from vlm.model import VisionLanguageModel
    from vlm.testing import tiny_clip, tiny_lm, tiny_tokenizer
    vision, preprocess = tiny_clip()
    tokenizer = tiny_tokenizer()
    lm = tiny_lm("llama", tokenizer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        VisionLanguageModel.load_adapter(sys.argv[1], vision, lm, tokenizer, preprocess=preprocess)
        outcome = "loaded"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MiB
    print(json.dumps({"outcome": outcome, "grown_mib": grown}))
    """
)


def test_sizes_in_a_manifest_allocate_nothing_before_the_checks(saved, tmp_path):
    """The probe: ``num_latents=6e7`` allocated 7.7 GB before any check. Here 8e6 latents (1.5 GB of
    fp32 at the tiny width) must be refused with a shape mismatch, the process growing by < 300 MiB."""
    directory = _copy(saved, tmp_path)
    manifest = _manifest(directory)
    manifest["config"]["resampler"]["num_latents"] = 8_000_000
    _write_manifest(directory, manifest)
    script = tmp_path / "size_worker.py"
    script.write_text(SIZE_WORKER)
    env = {"PYTHONPATH": f"{TESTS.parent}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), str(directory)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("ValueError") and "resampler.latents has shape" in result["outcome"], result
    assert "this model expects (8000000," in result["outcome"], result
    assert result["grown_mib"] < 300, result


# ----------------------------------------------------------------------------------------------
# A refused adapter changes nothing


@pytest.mark.parametrize("damage", ["missing_lora_tensor", "lora_r", "image_token_id", "lora_targets", "nan"])
def test_a_refused_adapter_leaves_the_callers_lm_embeddings_and_tokenizer_bit_identical(saved, tmp_path, damage):
    directory = _copy(saved, tmp_path)
    state = load_file(str(directory / "adapter.safetensors"))
    manifest = _manifest(directory)
    if damage == "missing_lora_tensor":
        del state[next(k for k in sorted(state) if "lora_" in k)]
        _rewrite_weights(directory, state)
        pattern = r"adapter tensors do not match this model: missing \['lm\..*lora_"
    elif damage == "lora_r":
        manifest["config"]["lora"]["r"] = 8  # the file holds r=4 matrices
        _write_manifest(directory, manifest)
        pattern = r"lora_(A|B).default.weight has shape \((4, \d+|\d+, 4)\), this model expects \((8, \d+|\d+, 8)\)"
    elif damage == "image_token_id":
        manifest["tokenizer"]["image_token_id"] = 7
        _write_manifest(directory, manifest)
        pattern = r"adapter has '<image>' at id 7, this tokenizer has it at 320"
    elif damage == "lora_targets":
        manifest["config"]["lora"]["target_modules"] = ["q_proj"]
        _write_manifest(directory, manifest)
        pattern = r"unexpected \['lm\..*(k|v|o)_proj"
    else:
        _rewrite_weights(directory, {k: torch.full_like(v, float("nan")) for k, v in state.items()})
        pattern = r"non-finite values; refused"
    vision, preprocess, lm, tokenizer = _caller_parts()
    before = _snapshot(lm, tokenizer)
    with pytest.raises(ValueError, match=pattern):
        _load(directory, vision, preprocess, lm, tokenizer)
    _unchanged(before, lm, tokenizer)
    assert before["rows"] == before["tokens"] == 320  # the tiny LM's vocabulary, before and after


# ----------------------------------------------------------------------------------------------
# Base models named by a foreign manifest


def test_a_manifest_named_lm_is_used_only_when_the_caller_passes_none_and_is_logged(saved, tmp_path, monkeypatch,
                                                                                    caplog):  # fmt: skip
    import vlm.checkpoint

    directory = _copy(saved, tmp_path)
    manifest = _manifest(directory)
    manifest["config"]["lm"]["name_or_path"] = "/etc/some-stranger/lm"
    _write_manifest(directory, manifest)
    asked = []

    def fake_lm(config):
        asked.append(config.name_or_path)
        return tiny_lm("llama", tiny_tokenizer())

    monkeypatch.setattr(vlm.checkpoint, "load_language_model", fake_lm)
    monkeypatch.setattr(vlm.checkpoint, "load_tokenizer", lambda config: asked.append("tok") or tiny_tokenizer())
    vision, preprocess, lm, tokenizer = _caller_parts()
    _load(directory, vision, preprocess, lm, tokenizer)
    assert asked == []  # the caller's parts: the manifest's path is never opened
    with caplog.at_level(logging.INFO, logger="vlm.checkpoint"):
        VisionLanguageModel.load_adapter(directory, vision, preprocess=preprocess)
    assert asked == ["/etc/some-stranger/lm", "tok"]
    assert "loading the LM its manifest names: '/etc/some-stranger/lm'" in caplog.text


# ----------------------------------------------------------------------------------------------
# Issue 15: train, save and load again in one process with the same tokenizer


def test_train_then_load_in_one_process_with_the_same_tokenizer(tmp_path):
    vision, preprocess, lm, tokenizer = tiny_parts("qwen2")
    size = len(tokenizer)
    model = VisionLanguageModel.from_parts(vision, lm, tokenizer, tiny_vlm_config("qwen2"), preprocess=preprocess)
    assert len(tokenizer) == size and "<image>" not in tokenizer.get_vocab()  # the caller's tokenizer is untouched
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    for _ in range(2):
        model(images=tiny_images(1), **batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_adapter(tmp_path / "adapter")

    fresh_lm = tiny_lm("qwen2", tokenizer)  # a fresh base LM built from the same tokenizer object
    again = VisionLanguageModel.load_adapter(tmp_path / "adapter", vision, fresh_lm, tokenizer, preprocess=preprocess)
    model.eval(), again.eval()
    torch.testing.assert_close(
        again(images=tiny_images(1), **batch).logits, model(images=tiny_images(1), **batch).logits, rtol=0, atol=0
    )


def test_an_lm_that_already_holds_the_added_rows_loads(saved, tmp_path):
    """A tokenizer that already has ``<image>`` (from an older build) and an LM sized for it."""
    model, directory = saved
    vision, preprocess = tiny_clip()
    tokenizer = tiny_tokenizer()
    lm = tiny_lm("llama", tokenizer)  # the same base weights as the saved model's LM...
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm.resize_token_embeddings(len(tokenizer))  # ...grown to 321 rows: the adapter's added row is already there
    again = VisionLanguageModel.load_adapter(directory, vision, lm, tokenizer, preprocess=preprocess)
    batch = model.processor(["<image>Caption:"], captions=["a red circle"])
    model.eval(), again.eval()
    torch.testing.assert_close(
        again(images=tiny_images(1), **batch).logits, model(images=tiny_images(1), **batch).logits
    )
