"""Bring your own weights: a missing local path says "no such directory/file" (not the hub's repo-id error);
an adapter of a custom open_clip tower reloads in a fresh process; configs/local.yaml runs end to end on
local images, local open_clip weights and a local LM directory."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlm import LMConfig, VisionConfig, VisionLanguageModel
from vlm.language import load_language_model, load_tokenizer
from vlm.local import is_local_path
from vlm.testing import register_tiny_clip, tiny_parts, tiny_vlm_config
from vlm.towers import load_vision

ROOT = Path(__file__).resolve().parents[1]


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert not is_local_path("HuggingFaceTB/SmolLM2-135M") and not is_local_path("gpt2")
    for path in ("/models/lm", "./lm", "../lm", "~/lm", "runs/x/lm", ".", str(tmp_path)):
        assert is_local_path(path), path


@pytest.mark.parametrize("path", ["/nonexistent/my-lm", "./my-lm", "weights/lm/final"])
def test_a_missing_local_lm_directory_is_named(path):
    with pytest.raises(FileNotFoundError, match=rf"lm.name_or_path='{path}': no such directory"):
        load_language_model(LMConfig(name_or_path=path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(LMConfig(name_or_path=path))


def test_missing_local_tower_weights_are_named(tmp_path):
    name = register_tiny_clip()
    with pytest.raises(FileNotFoundError, match=r"vision.pretrained='/nonexistent/clip.pt': no such file"):
        load_vision(VisionConfig(name=name, pretrained="/nonexistent/clip.pt"))
    with pytest.raises(FileNotFoundError, match=r"vision.name \(local-dir:\)='/nonexistent/clip': no such directory"):
        load_vision(VisionConfig(name="local-dir:/nonexistent/clip", pretrained=None))
    with pytest.raises(FileNotFoundError, match="vision.name='/nonexistent/siglip': no such directory"):
        load_vision(VisionConfig(kind="siglip", name="/nonexistent/siglip", pretrained=None))


def test_adapter_of_a_custom_open_clip_tower_loads_in_a_fresh_process(tmp_path):
    import open_clip

    config_json = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 40, "head_width": 20, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1},
    }
    path = tmp_path / "my-custom-vit.json"
    path.write_text(json.dumps(config_json))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    clip_model, _, preprocess = open_clip.create_model_and_transforms("my-custom-vit")
    torch.save(clip_model.state_dict(), tmp_path / "clip.pt")
    _, _, lm, tokenizer = tiny_parts("llama")
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    config = tiny_vlm_config("llama", vision=VisionConfig(name="my-custom-vit", pretrained=str(tmp_path / "clip.pt")))
    config.lm.name_or_path = str(tmp_path / "lm")
    model = VisionLanguageModel.from_parts(clip_model, lm, tokenizer, config, preprocess=preprocess)
    model.save_adapter(tmp_path / "adapter")
    path.unlink()  # the JSON the user registered is gone too: the manifest alone must do
    script = textwrap.dedent(
        f"""
        from vlm import VisionLanguageModel
        model = VisionLanguageModel.load_adapter({str(tmp_path / "adapter")!r})
        print(model.vision.width, model.vision.num_patches)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["40", "4"]


def test_an_adapter_whose_tower_name_means_another_config_here_is_refused(tmp_path, monkeypatch):
    from vlm.local import register_open_clip_config

    name = register_tiny_clip()
    with pytest.raises(ValueError, match="registered in this process has another config"):
        register_open_clip_config(name, {"embed_dim": 1}, "adapter")


def _write_local_layout(root: Path) -> None:
    """my_data/ (images + CSVs) and my_weights/ (open_clip weights, LM directory) as configs/local.yaml expects."""
    from vlm.data import SyntheticConfig, generate_scene

    images = root / "my_data" / "images"
    images.mkdir(parents=True)
    world = SyntheticConfig(image_size=32, captions_per_image=2)
    for split, n in (("train", 12), ("val", 4)):
        with open(root / "my_data" / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "caption"])
            for i in range(n):
                scene = generate_scene(world, split, i)
                scene.image.save(images / f"{split}{i}.png")
                writer.writerows([f"{split}{i}.png", c] for c in scene.captions)
    clip_model, _, lm, tokenizer = tiny_parts("llama")
    (root / "my_weights").mkdir()
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in clip_model.state_dict().items()}, root / "my_weights" / "open_clip.safetensors"
    )
    lm.save_pretrained(root / "my_weights" / "lm")
    tokenizer.save_pretrained(root / "my_weights" / "lm")


def test_local_example_config_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from vlm.cli import main_caption, main_eval, main_make_shards, main_train

    _write_local_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs" / "local.yaml")]
    small = [f"model.vision.name={register_tiny_clip()}", "data.batch_size=4", "data.num_workers=0",
             "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_cider_samples=2",
             "train.warmup_steps=1", "train.progress=false", "eval.max_new_tokens=4", "eval.batch_size=4",
             "eval.metrics_tokenizer=simple", "eval.meteor=false", "eval.progress=false"]  # fmt: skip
    main_make_shards([*config, "shards.progress=false"])
    main_make_shards([*config, "shards.captions_file=./my_data/val.csv", "shards.prefix=val", "shards.progress=false"])
    main_train([*config, *small])
    rows = list(csv.DictReader((tmp_path / "runs" / "local" / "eval_metrics.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["2", "4"]
    metrics = main_eval([*config, *small])
    assert "CIDEr" in json.loads((tmp_path / "runs" / "local" / "eval" / "metrics.json").read_text())["test"]
    main_caption([*config, *small, "--images", "my_data/images/val0.png"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "captioned 1 images; skipped 0"
    del metrics


def test_local_config_trains_with_its_data_workers_and_leaves_none_running(tmp_path, monkeypatch):
    """configs/local.yaml reads with 2 DataLoader workers; a run that ended used to leave them running,
    and the process then hung at exit (multiprocessing ends workers with SIGTERM, which they ignore)."""
    import multiprocessing

    from vlm.cli import main_make_shards, main_train

    _write_local_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs" / "local.yaml")]
    assert "num_workers: 2" in (ROOT / "configs" / "local.yaml").read_text()
    small = [f"model.vision.name={register_tiny_clip()}", "data.batch_size=4", "train.max_steps=3",
             "train.checkpoint_every=0", "train.eval_every=0", "train.warmup_steps=1", "train.progress=false"]  # fmt: skip
    main_make_shards([*config, "shards.progress=false"])
    before = set(multiprocessing.active_children())
    main_train([*config, *small])
    assert (tmp_path / "runs" / "local" / "metrics.csv").is_file()
    assert set(multiprocessing.active_children()) - before == set()
