"""The commands' steps after `prepare`: build the VLM, train it, load a trained adapter, evaluate, caption files.

Each ``pvlm-*`` command is one function here or in `vlm.pipeline.assets` / `vlm.pipeline.evaluate`
taking a `RunConfig` (plus the command's own options), so tests and notebooks run the same code as
the console scripts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from resampler.config import save_config, to_dict

from ..backbones import register_standin_vision
from ..data.decode import BadSample, decode_image
from ..data.reader import CaptionLoader
from ..data.shards import IMAGE_EXTENSIONS
from ..distributed import init_distributed, print0, rank
from ..io import atomic_write
from ..launch import check_launch, describe_world
from ..model import VisionLanguageModel
from ..training import TrainResult, set_seed, train
from ..training.fsdp import export_adapter
from ..training.interrupt import exit_status, stop_message
from .assets import prepare, split_spec
from .config import RunConfig
from .evaluate import run_evaluation, score_results
from .resume import check_resume
from .validate import make_validator

__all__ = [
    "build_model",
    "train_loader",
    "run_training",
    "load_trained",
    "cache_features",
    "train_adapter",
    "evaluate_adapter",
    "find_images",
    "caption_files",
    "demo",
]

log = logging.getLogger(__name__)


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
    """Train and write ``<output_dir>/adapter`` (the adapter-only checkpoint) on rank 0 (every rank calls).

    An output directory holding a run continues it, or says it is finished, or refuses a changed
    config (`vlm.pipeline.resume`). A run stopped by SIGINT/SIGTERM prints how to resume and exits
    with 128 + the signal's number (130, 143) after its checkpoint.
    """
    point = check_resume(cfg)
    if point is not None and point.finished and (cfg.out / "adapter").is_dir():
        print0(
            f"train: the run in {cfg.out} is finished (step {point.step} of {cfg.train.max_steps}, adapter in "
            f"{cfg.out / 'adapter'}); nothing to train. Raise train.max_steps to train on, or use a new output_dir."
        )
        model = load_trained(cfg) if model is None else model
        return model, TrainResult(point.step, [], point.step, cfg.out, cfg.out / "metrics.csv")
    model = build_model(cfg) if model is None else model
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print0(f"model: {n_train / 1e6:.3f} M trainable of {n_all / 1e6:.2f} M parameters")
    if rank() == 0:
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.out / "run_config.yaml")
    start = time.perf_counter()
    print0(describe_world(cfg.data.batch_size, cfg.train.grad_accum_steps))
    validate = make_validator(cfg, model)
    loader = train_loader(cfg, model)
    result = train(model, loader, cfg.train, cfg.out, seed=cfg.seed, run_config=to_dict(cfg), validate=validate)
    seconds = time.perf_counter() - start
    if result.stopped_by:
        print0(stop_message(result.stopped_by, result.step, cfg.train.max_steps, result.stop_checkpoint))
        raise SystemExit(exit_status(result.stopped_by))
    if result.step == cfg.train.max_steps:
        export_adapter(model, cfg.out / "adapter", step=result.step)  # rank 0 writes; a sharded model is gathered first
    print0(f"train: {result.step} steps; {_loss_summary(result.losses)}; {seconds:.1f} s this call")
    print0(
        f"train data: skipped {dict(loader.bad_samples)}, converted {dict(loader.converted)}; "
        f"{result.skipped_steps} optimizer steps skipped"
    )
    return model, result


def _loss_summary(losses: list[float]) -> str:
    if not losses:
        return "no step trained in this call"
    tail = losses[-20:]
    return f"last step's loss {losses[-1]:.4f} (mean of the last {len(tail)}: {sum(tail) / len(tail):.4f})"


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
    check_launch()
    return run_training(prepare(cfg))


def evaluate_adapter(cfg: RunConfig, adapter: str | Path | None = None) -> dict:
    """``pvlm-eval``: prepare what the splits need, load the trained adapter, evaluate it; with
    ``eval.results_file`` set, score that COCO results file instead (no model)."""
    if cfg.eval.results_file:
        return score_results(cfg)
    cfg = prepare(cfg)
    return run_evaluation(cfg, load_trained(cfg, adapter))


def find_images(specs: list[str], skipped: Counter[str]) -> list[Path]:
    """Image files from paths, folders (every image file under them) and globs, in order, each once.

    A path that does not exist and a glob or folder with no image file are counted in ``skipped``
    (``missing_file``, ``no_match``), never fatal; a named file is kept whatever its suffix (it is
    decoded later, and counted there if it is no image).
    """
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            hits = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
            )
        elif path.is_file():
            hits = [path]
        elif glob.has_magic(spec):
            hits = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        else:
            skipped["missing_file"] += 1
            log.warning("caption: %s does not exist; skipped", spec)
            continue
        if not hits:
            skipped["no_match"] += 1
            log.warning("caption: no image file in %s; skipped", spec)
        found.update(dict.fromkeys(hits))
    return list(found)


def _read_image(path: Path, max_pixels: int, skipped: Counter[str]) -> Image.Image | None:
    try:
        return decode_image(path.read_bytes(), max_pixels)[0]
    except BadSample as bad:
        reason, detail = bad.reason, str(bad)
    except OSError as err:
        reason, detail = "unreadable_file", str(err)
    skipped[reason] += 1
    log.warning("caption: skipping %s (%s)", path, detail)
    return None


def caption_files(
    cfg: RunConfig,
    images: list[str],
    adapter: str | Path | None = None,
    batch_size: int | None = None,
    output: str | Path | None = None,
) -> dict[str, str]:
    """``pvlm-caption``: print ``path: caption`` for every image among ``images`` (files, folders, globs),
    ``batch_size`` (default ``eval.batch_size``) at a time. Unreadable, corrupt or truncated files are
    skipped and counted, never fatal; ``output`` also writes ``{"image", "caption"}`` JSON lines
    (atomically, when all are done). Returns {path: caption}; no readable image at all is an error."""
    batch_size = cfg.eval.batch_size if batch_size is None else batch_size
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    skipped: Counter[str] = Counter()
    paths = find_images(images, skipped)
    model = load_trained(cfg, adapter) if paths else None
    captions: dict[str, str] = {}
    bar = tqdm(total=len(paths), desc="caption", unit="img", disable=not cfg.eval.progress)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pictures = {p: _read_image(p, cfg.data.max_image_pixels, skipped) for p in chunk}
        good = [p for p, picture in pictures.items() if picture is not None]
        if good:
            texts = model.caption([pictures[p] for p in good], max_new_tokens=cfg.eval.max_new_tokens)
            for path, text in zip(good, texts):
                captions[str(path)] = text
                tqdm.write(f"{path}: {text}", file=sys.stdout)
        bar.update(len(chunk))
    bar.close()
    counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
    print(f"captioned {len(captions)} images; skipped {skipped.total()}" + (f" ({counts})" if counts else ""))
    if not captions:
        raise ValueError(f"pvlm-caption: no readable image among {images} (skipped: {counts or 'none found'})")
    if output:
        lines = "".join(json.dumps({"image": p, "caption": c}, ensure_ascii=False) + "\n" for p, c in captions.items())
        atomic_write(output, lines)
    return captions


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
