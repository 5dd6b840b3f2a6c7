"""Checkpoints from strangers: an adapter saved for another LM (family, hidden size, vocabulary), a
truncated or swapped safetensors file, a manifest from a newer library version -> a clear error and
no partial load: the caller's models are left exactly as they were."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext

import pytest
import torch

from vlm.checkpoint import adapter_state_dict, load_adapter_weights
from vlm.model import VisionLanguageModel
from vlm.testing import tiny_clip, tiny_images, tiny_lm, tiny_tokenizer, tiny_vlm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_vlm("llama")
    with torch.no_grad():  # trained-looking weights, so a load is visible
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory = model.save_adapter(tmp_path_factory.mktemp("ckpt") / "adapter")
    return model, directory


def _fingerprint(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name: a changed name set or value means the module was touched."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load(directory, lm, tokenizer=None):
    vision, preprocess = tiny_clip()
    tokenizer = tiny_tokenizer() if tokenizer is None else tokenizer
    return VisionLanguageModel.load_adapter(directory, vision, lm, tokenizer, preprocess=preprocess)


def test_matching_parts_load_and_reproduce_the_logits(saved):
    model, directory = saved
    tokenizer = tiny_tokenizer()
    loaded = _load(directory, tiny_lm("llama", tokenizer), tokenizer)
    batch = model.processor(["<image>Caption:"], captions=["a red circle"])
    model.eval(), loaded.eval()
    torch.testing.assert_close(
        loaded(images=tiny_images(1), **batch).logits, model(images=tiny_images(1), **batch).logits
    )


@pytest.mark.parametrize(
    "family,overrides,field",
    [
        ("gpt2", {}, "model_type='llama', but this LM has model_type='gpt2'"),
        ("qwen2", {}, "model_type='llama', but this LM has model_type='qwen2'"),
        ("llama", {"hidden_size": 48}, "hidden_size=32, but this LM has hidden_size=48"),
        ("llama", {"vocab_size": 400}, "but this LM has vocab_size=400"),
    ],
)
def test_an_adapter_for_another_lm_is_refused_and_the_lm_is_untouched(saved, family, overrides, field):
    _, directory = saved
    lm = tiny_lm(family, tiny_tokenizer(), **overrides)
    before = _fingerprint(lm)
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        _load(directory, lm)
    assert _same(before, _fingerprint(lm))  # no LoRA injected, no rows added, no weight copied


def test_an_adapter_for_another_vision_tower_is_refused(saved, tmp_path):
    _, directory = saved
    copy = shutil.copytree(directory, tmp_path / "adapter")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["vision"]["width"] = 768
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lm = tiny_lm("llama", tiny_tokenizer())
    before = _fingerprint(lm)
    with pytest.raises(ValueError, match="vision tower of width 768"):
        _load(copy, lm)
    assert _same(before, _fingerprint(lm))


@pytest.mark.parametrize("keep", [0, 8, 100, 0.5, -1])
@pytest.mark.parametrize("recorded", [True, False])
def test_a_truncated_safetensors_file_is_a_clear_error(saved, tmp_path, keep, recorded):
    _, directory = saved
    copy = shutil.copytree(directory, tmp_path / "adapter")
    weights = copy / "adapter.safetensors"
    data = weights.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    weights.write_bytes(data[:cut])
    if not recorded:  # an adapter saved before digests were recorded: the parser is what refuses it
        manifest = json.loads((copy / "manifest.json").read_text())
        del manifest["files"]
        (copy / "manifest.json").write_text(json.dumps(manifest))
    lm = tiny_lm("llama", tiny_tokenizer())
    before = _fingerprint(lm)
    pattern = r"is \d+ bytes, its record says \d+: cut or replaced" if recorded else r"is truncated or corrupt"
    with pytest.raises(ValueError, match=rf"adapter.safetensors {pattern}.*nothing was loaded"):
        _load(copy, lm)
    assert _same(before, _fingerprint(lm))


def test_weights_that_do_not_match_their_manifest_are_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, directory = saved
    copy = shutil.copytree(directory, tmp_path / "adapter")
    state = load_file(str(copy / "adapter.safetensors"))
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)  # a file swapped in from elsewhere
    save_file(state, str(copy / "adapter.safetensors"))
    with pytest.raises(ValueError, match="its record says"):  # the digest catches the swap first
        _load(copy, tiny_lm("llama", tiny_tokenizer()))
    rerecord_adapter(copy)  # a swap that also rewrote the digest: the tensor list still refuses it
    with pytest.raises(ValueError, match="does not hold the tensors its manifest lists"):
        _load(copy, tiny_lm("llama", tiny_tokenizer()))


def rerecord_adapter(directory) -> None:
    """Record the current digest of ``adapter.safetensors`` in the manifest (as a stranger can)."""
    from vlm.integrity import digest

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["adapter.safetensors"] = digest((directory / "adapter.safetensors").read_bytes())
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [2, 99, None, "1"])
def test_a_manifest_from_another_format_version_is_refused(saved, tmp_path, version):
    _, directory = saved
    copy = shutil.copytree(directory, tmp_path / "adapter")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = version
    manifest["library"]["version"] = "9.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lm = tiny_lm("llama", tiny_tokenizer())
    before = _fingerprint(lm)
    with pytest.raises(ValueError, match=r"format_version .*this library reads 1"):
        _load(copy, lm)
    assert _same(before, _fingerprint(lm))


def test_missing_or_garbled_files_are_clear_errors(saved, tmp_path):
    _, directory = saved
    copy = shutil.copytree(directory, tmp_path / "adapter")
    (copy / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        _load(copy, tiny_lm("llama", tiny_tokenizer()))
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        _load(copy, tiny_lm("llama", tiny_tokenizer()))
    garbled = shutil.copytree(directory, tmp_path / "garbled")
    (garbled / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError):
        _load(garbled, tiny_lm("llama", tiny_tokenizer()))


def test_loading_wrong_tensors_into_a_built_model_changes_nothing():
    model = tiny_vlm("llama")
    state = adapter_state_dict(model)
    before = _fingerprint(model)
    names = sorted(state)
    wrong_shape = {**state, names[-1]: torch.zeros(1)}  # every earlier tensor is fine: would load first
    missing = {k: v for k, v in state.items() if k != names[0]}
    extra = {**state, "resampler.extra": torch.zeros(2)}
    for bad, pattern in ((wrong_shape, "has shape"), (missing, "missing"), (extra, "unexpected")):
        bad = {k: torch.randn_like(v) if k != names[-1] else v for k, v in bad.items()}
        with pytest.raises(ValueError, match=pattern):
            load_adapter_weights(model, bad)
        assert _same(before, _fingerprint(model))


# ----------------------------------------------------------------------------------------------
# Training checkpoints


def _training_checkpoint(tmp_path):
    from test_train import make, quiet

    from vlm.training import latest_checkpoint, train

    model, loader = make()
    train(model, loader, quiet(max_steps=2), tmp_path)
    return latest_checkpoint(tmp_path)


def _rerecord(ckpt, name):
    """Record a damaged file's new digest in state.json, as a checkpoint consistently written wrong would:
    the checks behind the digest (parsing, names, shapes) are then what refuses it."""
    from vlm.integrity import digest

    state = json.loads((ckpt / "state.json").read_text())
    state["files"][name] = digest((ckpt / name).read_bytes())
    (ckpt / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    "damage,recorded,pattern",
    [
        ("cut_weights", False, r"trainable.safetensors is 100 bytes, its record says \d+: cut or replaced"),
        ("cut_optimizer", False, r"optimizer.pt is 100 bytes, its record says"),
        ("cut_rng", False, r"rng.pt is 100 bytes, its record says"),
        ("drop_tensor", False, r"trainable.safetensors is \d+ bytes, its record says"),
        ("cut_weights", True, r"trainable.safetensors is truncated or corrupt"),
        ("drop_tensor", True, r"trainable.safetensors does not hold the tensors state.json lists"),
        ("reshape_tensor", True, r"trainable.safetensors holds .* with shape"),
        ("cut_optimizer", True, r"optimizer.pt is truncated or corrupt"),
        ("cut_rng", True, r"rng.pt is truncated or corrupt"),
    ],
)
def test_a_damaged_training_checkpoint_is_a_clear_error_and_loads_nothing(tmp_path, damage, recorded, pattern):
    from safetensors.torch import load_file, save_file
    from test_train import make, quiet

    from vlm.training import train

    ckpt = _training_checkpoint(tmp_path)
    weights = ckpt / "trainable.safetensors"
    if damage.startswith("cut_"):
        target = {"cut_weights": weights, "cut_optimizer": ckpt / "optimizer.pt", "cut_rng": ckpt / "rng.pt"}[damage]
        target.write_bytes(target.read_bytes()[:100])
    else:
        target = weights
        state = load_file(str(weights))
        name = sorted(k for k in state if k.startswith("connector"))[0]
        if damage == "drop_tensor":
            del state[name]
        else:
            state[name] = state[name][:-1].clone()  # one row short
        save_file(state, str(weights))
    if recorded:
        _rerecord(ckpt, target.name)
    model, loader = make(seed=7)
    before = _fingerprint(model)
    # a file that fails verification is skipped with a warning; one that verifies but does not fit is refused
    skipped = pytest.warns(RuntimeWarning, match="skipping checkpoint") if damage != "reshape_tensor" else nullcontext()
    with pytest.raises(ValueError, match=pattern), skipped:
        train(model, loader, quiet(max_steps=4), tmp_path)
    assert _same(before, _fingerprint(model))  # nothing copied before the error
