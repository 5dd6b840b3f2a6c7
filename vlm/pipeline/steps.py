"""The commands' steps after `prepare`: build the VLM, train it, load a trained adapter, caption files.

Each ``pvlm-*`` command is one function here or in `vlm.pipeline.assets` / `vlm.pipeline.evaluate`
taking a `RunConfig` (plus the command's own options), so tests and notebooks run the same code as
the console scripts.
"""

from __future__ import annotations

import resource
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from resampler.config import save_config, to_dict

from ..backbones import register_standin_vision
from ..data.reader import CaptionLoader
from ..distributed import init_distributed, print0, rank
from ..model import VisionLanguageModel
from ..training import TrainResult, set_seed, train
from ..training.fsdp import export_adapter
from .assets import prepare, split_spec
from .config import RunConfig
from .evaluate import run_evaluation

__all__ = [
    "build_model",
    "train_loader",
    "run_training",
    "load_trained",
    "cache_features",
    "train_adapter",
    "evaluate_adapter",
    "caption_files",
    "demo",
]


def build_model(cfg: RunConfig) -> VisionLanguageModel:
    """The VLM of ``cfg.model`` (tower and LM loaded by name or path), seeded with ``cfg.seed``."""
    set_seed(cfg.seed)
    return VisionLanguageModel.from_config(cfg.model)


def train_loader(cfg: RunConfig, model: VisionLanguageModel) -> CaptionLoader:
    return CaptionLoader(
        split_spec(cfg, "train"),
        cfg.data,
        transform=model.vision.preprocess,
        text=model.processor,
        prompt=model.config.caption_prompt,
        train=True,
    )


def run_training(cfg: RunConfig, model: VisionLanguageModel | None = None) -> tuple[VisionLanguageModel, TrainResult]:
    """Train and write ``<output_dir>/adapter`` (the adapter-only checkpoint) on rank 0 (every rank calls)."""
    model = build_model(cfg) if model is None else model
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print0(f"model: {n_train / 1e6:.3f} M trainable of {n_all / 1e6:.2f} M parameters")
    if rank() == 0:
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.out / "run_config.yaml")
    start = time.perf_counter()
    result = train(model, train_loader(cfg, model), cfg.train, cfg.out, seed=cfg.seed, run_config=to_dict(cfg))
    seconds = time.perf_counter() - start
    if result.step == cfg.train.max_steps:
        export_adapter(model, cfg.out / "adapter")  # rank 0 writes; a sharded model is gathered first
    tail = result.losses[-20:] or [float("nan")]
    print0(f"train: {result.step} steps, last loss {sum(tail) / len(tail):.4f}, {seconds:.1f} s this call")
    return model, result


def load_trained(cfg: RunConfig, adapter: str | Path | None = None) -> VisionLanguageModel:
    """The VLM of a finished run: base parts from the adapter's manifest, adapter weights strictly."""
    if cfg.standin.enabled:
        register_standin_vision(cfg.standin_dir / "vision")
    path = Path(adapter) if adapter else cfg.out / "adapter"
    if not path.is_dir():
        raise ValueError(f"no adapter at {path}: train first (pvlm-train) or pass --adapter")
    return VisionLanguageModel.load_adapter(path)


# ----------------------------------------------------------------------------------------------
# Commands


def cache_features(cfg: RunConfig) -> None:
    """``pvlm-precompute-features``: the world and stand-ins if asked for, then the feature cache."""
    prepare(replace(cfg, data=replace(cfg.data, use_cached_features=True)), features=True)


def train_adapter(cfg: RunConfig) -> tuple[VisionLanguageModel, TrainResult]:
    """``pvlm-train``: join torchrun's process group (if any), prepare, train."""
    init_distributed()
    return run_training(prepare(cfg))


def evaluate_adapter(cfg: RunConfig, adapter: str | Path | None = None) -> dict:
    """``pvlm-eval``: prepare what the splits need, load the trained adapter, evaluate it."""
    cfg = prepare(cfg)
    return run_evaluation(cfg, load_trained(cfg, adapter))


def caption_files(cfg: RunConfig, images: list[str], adapter: str | Path | None = None) -> list[str]:
    """``pvlm-caption``: print ``path: caption`` for every image file."""
    model = load_trained(cfg, adapter)
    pictures = [Image.open(p).convert("RGB") for p in images]
    texts = model.caption(pictures, max_new_tokens=cfg.eval.max_new_tokens)
    for path, text in zip(images, texts):
        print(f"{path}: {text}")
    return texts


def demo(cfg: RunConfig) -> dict:
    """``pvlm-demo``: the embedded default: world -> stand-in backbones -> feature cache -> train -> evaluate."""
    start = time.perf_counter()
    cfg = prepare(cfg)
    print0(f"prepared in {time.perf_counter() - start:.1f} s")
    model, _ = run_training(cfg)
    print0(f"trained; {time.perf_counter() - start:.1f} s so far")
    metrics = run_evaluation(cfg, model)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print0(
        f"demo done in {time.perf_counter() - start:.1f} s wall ({cpu.ru_utime + cpu.ru_stime:.1f} s CPU); "
        f"metrics in {cfg.out / 'eval' / 'metrics.json'}"
    )
    return metrics
