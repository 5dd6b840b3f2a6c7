"""The COCO recipes: their configs load, and the exact commands of docs/datasets.md run from a COCO download
layout (real photos, COCO's folders and files) to a Karpathy-test results file scored against
``captions_val2014.json``, with tiny model parts substituted by overrides (everything after the download)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from resampler.config import load_config
from vlm import RunConfig
from vlm.cli import run
from vlm.data.tiny_datasets import write_karpathy_layout

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"coco_clipcap_gpt2": "gpt2", "coco_smollm2_lora": "llama"}  # config -> the tiny LM family standing in


def recipe_commands(config: str) -> list[list[str]]:
    """The commands of the recipe block in docs/datasets.md, for ``config`` (the docs say: replace the name)."""
    text = (ROOT / "docs" / "datasets.md").read_text()
    block = re.search(r"<!-- recipe: coco_clipcap_gpt2 -->\n```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").replace("coco_clipcap_gpt2", config).splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("config", RECIPES)
def test_recipe_config_is_what_the_docs_say(config):
    cfg = load_config(RunConfig, ROOT / "configs" / f"{config}.yaml")
    assert cfg.model.vision.name == "ViT-B-32" and cfg.model.vision.pretrained == "openai"
    assert cfg.model.injection.mode == "prefix" and cfg.data.use_cached_features
    assert cfg.eval.splits == ("test",) and cfg.shards.source == "karpathy"
    if config == "coco_clipcap_gpt2":
        assert cfg.model.lm.name_or_path == "openai-community/gpt2" and not cfg.model.lora.enabled
        assert cfg.model.resampler.num_latents == 40  # ClipCap's prefix length
    commands = recipe_commands(config)
    assert [c[0] for c in commands] == ["pvlm-make-shards"] * 3 + ["pvlm-precompute-features", "pvlm-train"] + [
        "pvlm-eval"
    ] * 2
    assert all(c[1:3] == ["--config", f"configs/{config}.yaml"] for c in commands)


def test_clipcap_trainable_parameters_are_the_documented_51m():
    import resampler
    from vlm.model import build_projector

    cfg = load_config(RunConfig, ROOT / "configs" / "coco_clipcap_gpt2.yaml").model
    fields = {k: v for k, v in vars(cfg.resampler).items() if k != "trainable"}
    module = resampler.PerceiverResampler(resampler.ResamplerConfig(**{**fields, "dim": 768}))  # ViT-B/32 width
    n = sum(p.numel() for p in module.parameters()) + sum(
        p.numel()
        for p in build_projector(cfg.projector.kind, 768, 768).parameters()  # GPT-2 width
    )
    assert round(n / 1e6, 1) == 51.0
    assert "51.0M (resampler 50.4M + projection 0.6M" in (ROOT / "docs" / "datasets.md").read_text()


def _tiny_parts(root: Path, family: str) -> list[str]:
    """Overrides that swap the recipe's hub parts for tiny local ones and shrink every size."""
    from vlm.testing import register_tiny_clip, tiny_clip, tiny_lm, tiny_tokenizer

    model, _ = tiny_clip(seed=0)
    torch.save(model.state_dict(), root / "clip.pt")
    tokenizer = tiny_tokenizer()
    tiny_lm(family, tokenizer).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return [
        f"model.vision.name={register_tiny_clip()}", f"model.vision.pretrained={root / 'clip.pt'}",
        f"model.lm.name_or_path={root / 'lm'}", "model.lm.dtype=float32", "model.resampler.depth=1",
        "model.resampler.num_latents=4", "model.resampler.heads=2", "model.resampler.head_dim=16",
        "model.resampler.num_patch_positions=16", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "data.sample_shuffle=4", "features.batch_size=8", "train.max_steps=2", "train.warmup_steps=0",
        "train.precision=fp32", "train.device=cpu", "train.checkpoint_every=0", "train.progress=false",
        "train.tensorboard=false", "train.plot=false", "eval.batch_size=4", "eval.num_beams=1",
        "eval.max_new_tokens=4", "eval.metrics_tokenizer=simple", "eval.meteor=false", "eval.progress=false",
        "eval.grid_samples=2", "shards.samples_per_shard=2", "shards.progress=false",
    ]  # fmt: skip


@pytest.mark.parametrize("config", RECIPES)
def test_recipe_commands_run_from_a_coco_download(config, tmp_path, monkeypatch):
    coco = write_karpathy_layout(tmp_path / "coco")  # train2014/, val2014/, annotations/, dataset_coco.json
    run_dir = tmp_path / "run"
    overrides = [f"output_dir={run_dir}", *_tiny_parts(tmp_path, RECIPES[config])]
    monkeypatch.chdir(ROOT)  # the commands name configs/<recipe>.yaml relative to the repository
    for command in recipe_commands(config):
        name = command[0].removeprefix("pvlm-")
        argv = [a.replace("$COCO", str(coco)).replace(f"runs/{config}", str(run_dir)) for a in command[1:]]
        run(name, [*argv, *overrides])
    index = {
        p: json.loads((run_dir / "data" / f"{p}-index.json").read_text())["num_samples"]
        for p in ("train", "val", "test")
    }
    assert index == {"train": 6, "val": 3, "test": 3}  # train+restval, val, test of the 12 images
    rows = json.loads((coco / "dataset_coco.json").read_text())["images"]
    results = json.loads((run_dir / "eval" / "test.coco_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(r["cocoid"] for r in rows if r["split"] == "test")
    ours = json.loads((run_dir / "eval" / "metrics.json").read_text())["test"]
    against_coco = json.loads((run_dir / "eval" / "test.coco_results.metrics.json").read_text())
    assert against_coco["CIDEr"] == pytest.approx(ours["CIDEr"], abs=1e-12)  # COCO's own references: same score
    assert against_coco["images_without_prediction"] == 6  # restval + val images of val2014
