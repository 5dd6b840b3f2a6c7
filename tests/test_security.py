"""Safe loading: a scan of the packages (no pickle, ``torch.load(weights_only=True)`` only, no unsafe
YAML, ``trust_remote_code`` never on by default) and behaviour checks: a malicious pickle in a
checkpoint does not run, crafted pointers and paths cannot leave their directory."""

from __future__ import annotations

import ast
import functools
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import make, quiet

from vlm.config import LMConfig
from vlm.training import latest_checkpoint, train

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["resampler", "vlm", "scripts", "benchmarks"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "shelve", "marshal", "joblib", "cloudpickle"}


def _sources() -> list[Path]:
    files = [p for d in SCANNED if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, files  # the scan must actually see the packages
    return files


@functools.cache
def _parsed() -> tuple[tuple[Path, ast.AST], ...]:
    return tuple(
        (path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) for path in _sources()
    )


def _trees():
    yield from _parsed()


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


# ----------------------------------------------------------------------------------------------
# Static scan


def test_no_pickle_modules_are_imported():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            found += [f"{path}:{node.lineno} imports {n}" for n in names if n in UNSAFE_MODULES]
    assert not found, found


def test_every_torch_load_uses_weights_only_and_numpy_never_unpickles():
    found, loads = [], 0
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name.endswith("torch.load") or name == "load" and _imported_from(tree, "torch", "load"):
                loads += 1
                if not _is_true(_kw(node, "weights_only")):
                    found.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            allow = _kw(node, "allow_pickle")
            if name in ("np.load", "numpy.load") and allow is not None and not _is_false(allow):
                found.append(f"{path}:{node.lineno} np.load with allow_pickle")
            if name in ("pd.read_pickle", "pandas.read_pickle", "torch.jit.load"):
                found.append(f"{path}:{node.lineno} {name}")
    assert not found, found
    assert loads >= 1  # the training checkpoint's optimizer and RNG state: the scan sees the loader


def test_weights_are_written_as_safetensors_only():
    """``torch.save`` (a pickle) only for the optimizer and RNG state of training checkpoints."""
    writers = {}
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) == "torch.save":
                writers.setdefault(str(path), []).append(node.lineno)
    assert set(writers) <= {"vlm/training/state.py"}, writers
    assert len(writers.get("vlm/training/state.py", [])) <= 2, writers


def _imported_from(tree: ast.AST, module: str, name: str) -> bool:
    return any(
        isinstance(n, ast.ImportFrom) and n.module == module and any(a.name == name for a in n.names)
        for n in ast.walk(tree)
    )


def test_yaml_and_code_evaluation_are_safe():
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                found.append(f"{path}:{node.lineno} {name}")
            if name == "yaml.load":
                loader = _dotted(_kw(node, "Loader")) if _kw(node, "Loader") is not None else ""
                if "Safe" not in loader:
                    found.append(f"{path}:{node.lineno} yaml.load without a SafeLoader")
            if name in ("eval", "exec"):
                found.append(f"{path}:{node.lineno} {name}()")
    assert not found, found


def test_trust_remote_code_is_never_on_by_default():
    found, mentions = [], 0
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                mentions += 1
                if _is_true(node.value):
                    found.append(f"{path}:{node.value.lineno} passes trust_remote_code=True")
            if isinstance(node, ast.Dict):  # {"trust_remote_code": value} kwargs dicts
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                        mentions += 1
                        if _is_true(value):
                            found.append(f"{path}:{key.lineno} sets trust_remote_code True")
            field = isinstance(node, ast.AnnAssign) and _dotted(node.target) == "trust_remote_code"
            if field and not _is_false(node.value):
                found.append(f"{path}:{node.lineno} trust_remote_code field does not default to False")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults)
                defaults += list(node.args.kw_defaults)
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code" and _is_true(default):
                        found.append(f"{path}:{node.lineno} {node.name}(trust_remote_code=True)")
    assert not found, found
    assert mentions >= 2  # the LM and tokenizer loaders pass the config's value explicitly


def test_lm_loaders_pass_trust_remote_code_false_unless_asked(monkeypatch):
    import transformers

    from vlm.language import load_language_model, load_tokenizer

    seen = []

    def capture(name, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop")  # no download: we only want the arguments

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture)
    assert LMConfig().trust_remote_code is False
    for config in (LMConfig(name_or_path="x"), LMConfig(name_or_path="x", trust_remote_code=True)):
        for loader in (load_language_model, load_tokenizer):
            with pytest.raises(RuntimeError, match="stop"):
                loader(config)
    assert seen == [False, False, True, True]


# ----------------------------------------------------------------------------------------------
# Behaviour: malicious checkpoints


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _trained_run(tmp_path: Path) -> Path:
    model, loader = make()
    train(model, loader, quiet(max_steps=2), tmp_path)
    return latest_checkpoint(tmp_path)


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng.pt"])
def test_a_malicious_pickle_in_a_training_checkpoint_never_runs(tmp_path, victim):
    ckpt = _trained_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    with open(ckpt / victim, "wb") as fh:
        pickle.dump({"optimizer": _Payload(marker)}, fh, protocol=2)
    model, loader = make()
    with pytest.raises(ValueError, match=f"{victim} is \\d+ bytes, its record says"), pytest.warns(RuntimeWarning):
        train(model, loader, quiet(max_steps=4), tmp_path / "run")  # refused by its digest before any unpickling
    assert not marker.exists()
    from vlm.integrity import digest  # a stranger who also rewrote the digest: weights_only=True still refuses

    state = json.loads((ckpt / "state.json").read_text())
    state["files"][victim] = digest((ckpt / victim).read_bytes())
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(pickle.UnpicklingError):
        train(model, loader, quiet(max_steps=4), tmp_path / "run")
    assert not marker.exists()


def test_training_checkpoints_keep_weights_in_safetensors_only(tmp_path):
    ckpt = _trained_run(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.pt", "rng.pt", "state.json", "trainable.safetensors"]
    # the pickled parts hold no weight: they load with weights_only=True and name no parameter
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(opt) == {"optimizer", "scheduler", "scaler"}
    torch.load(ckpt / "rng.pt", weights_only=True)


def test_a_crafted_latest_pointer_cannot_leave_the_checkpoint_directory(tmp_path):
    _trained_run(tmp_path / "run")
    outside = tmp_path / "elsewhere" / "step_0000099"
    outside.mkdir(parents=True)
    (outside / "state.json").write_text("{}")
    for pointer in ("../../elsewhere/step_0000099", str(outside), "step_0000002/../../../elsewhere/step_0000099"):
        (tmp_path / "run" / "checkpoints" / "latest").write_text(pointer)
        found = latest_checkpoint(tmp_path / "run")
        assert found == tmp_path / "run" / "checkpoints" / "step_0000002", pointer


def test_adapter_checkpoints_are_safetensors_plus_json(tmp_path):
    from vlm.testing import tiny_vlm

    model = tiny_vlm("llama")
    model.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors", "manifest.json"]
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["config"]["lm"]["trust_remote_code"] is False


def test_a_foreign_manifest_cannot_turn_on_trust_remote_code(tmp_path, monkeypatch):
    import vlm.checkpoint
    from vlm.model import VisionLanguageModel
    from vlm.testing import tiny_clip, tiny_lm, tiny_tokenizer, tiny_vlm

    tiny_vlm("llama").save_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["lm"]["trust_remote_code"] = True  # a stranger's manifest asks for remote code
    path.write_text(json.dumps(manifest))

    seen = []

    def fake_lm(config):  # the LM and tokenizer are loaded by name from the manifest: capture the flag
        seen.append(config.trust_remote_code)
        return tiny_lm("llama", tiny_tokenizer())

    monkeypatch.setattr(vlm.checkpoint, "load_language_model", fake_lm)  # parts the manifest names load here
    monkeypatch.setattr(
        vlm.checkpoint, "load_tokenizer", lambda config: seen.append(config.trust_remote_code) or tiny_tokenizer()
    )
    vision, preprocess = tiny_clip()
    model = VisionLanguageModel.load_adapter(tmp_path / "adapter", vision, preprocess=preprocess)
    assert seen == [False, False] and model.config.lm.trust_remote_code is False
    VisionLanguageModel.load_adapter(tmp_path / "adapter", vision, preprocess=preprocess, trust_remote_code=True)
    assert seen[2:] == [True, True]  # only the caller's explicit argument turns it on


# ----------------------------------------------------------------------------------------------
# Behaviour: paths from captions files and shards


def _png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_folder_captions_cannot_name_files_outside_the_image_folder(tmp_path):
    from vlm.data import shards_from_folder

    images, secret = tmp_path / "images", tmp_path / "secret.png"
    images.mkdir()
    (images / "ok.png").write_bytes(_png(0))
    secret.write_bytes(_png(1))
    (images / "link.png").symlink_to(secret)  # a symlink pointing out is outside too
    rows = [
        {"file": "ok.png", "caption": "fine"},
        {"file": "../secret.png", "caption": "escape"},
        {"file": str(secret), "caption": "absolute"},
        {"file": "link.png", "caption": "symlink"},
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows))
    summary = shards_from_folder(images, captions, tmp_path / "shards")
    assert summary.num_samples == 1 and summary.skipped == {"unsafe_path": 3}
    with tarfile.open(summary.shards[0]) as tar:
        payloads = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
    assert payloads == [_png(0)]


def test_img2dataset_source_cannot_pull_in_files_through_symlinks(tmp_path):
    from vlm.data import shards_from_img2dataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_png(0))
    (src / "a.txt").write_text("a caption")
    (tmp_path / "secret.png").write_bytes(_png(1))
    (src / "b.png").symlink_to(tmp_path / "secret.png")
    (src / "b.txt").write_text("another caption")
    summary = shards_from_img2dataset(src, tmp_path / "shards")
    assert summary.num_samples == 1 and summary.skipped == {"unsafe_path": 1}


def _evil_tar(path: Path) -> None:
    """A shard whose member names try to climb out: ``../../x.png``, ``/abs/y.png``."""
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(["../../escape", "/abs/escape", "sub/../../up", "plain"]):
            for ext, data in (("png", _png(i)), ("json", json.dumps({"captions": [f"c{i}"]}).encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_member_names_of_a_shard_never_become_paths(tmp_path):
    from vlm.data import DataConfig
    from vlm.data.features import precompute_features

    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    _evil_tar(work / "evil.tar")
    before = sorted(p for p in tmp_path.rglob("*"))
    config = DataConfig(batch_size=2, image_size=8, preprocess="plain", sample_shuffle=0, shard_shuffle=False)

    def tower(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(2).transpose(1, 2)  # (B, P, 3)

    out = work / "features"
    summary = precompute_features(str(work / "evil.tar"), out, tower, config)
    assert summary.num_samples == 4
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert created and all(p.is_relative_to(out) for p in created), created
    for shard in summary.shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                assert ".." not in member.name and not member.name.startswith("/") and "/" not in member.name
