"""Console commands, all driven by a `RunConfig` YAML plus ``section.field=value`` overrides.

    pvlm-make-shards          --config configs/tiny/make_shards.yaml   shards from the synthetic world / a folder / img2dataset
    pvlm-precompute-features  --config ...   the frozen tower's patch features (fp16) as new shards
    pvlm-train                --config ...   train resampler + projection + LoRA (torchrun for N processes)
    pvlm-eval                 --config ...   CIDEr / BLEU-4 / attribute accuracy, the no-image ablation, a PNG grid
    pvlm-caption              --config ... --images a.png b.png
    pvlm-demo                 [--config configs/default.yaml]   the embedded default: all of the above, offline

Each step is also a function (`prepare`, `build_model`, `run_training`, `run_evaluation`) so tests
and notebooks call the same code the commands run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from resampler.config import load_config, parse_cli, save_config, to_dict

from .backbones import ensure_standin_backbones, register_standin_vision
from .distributed import init_distributed
from .run_config import RunConfig
from .training import set_seed, train

__all__ = [
    "prepare",
    "build_model",
    "split_spec",
    "run_training",
    "run_evaluation",
    "main_make_shards",
    "main_precompute_features",
    "main_train",
    "main_eval",
    "main_caption",
    "main_demo",
    "DEFAULT_CONFIG",
]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
_DONE = ".complete"


def _log(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Steps


def prepare(cfg: RunConfig, *, features: bool = True) -> RunConfig:
    """Make what the config asks for and is not there yet: the synthetic world, the stand-in
    backbones, the feature cache. Returns the config with the resulting paths filled in."""
    if cfg.make_synthetic:
        cfg = make_synthetic_world(cfg)
    if cfg.standin.enabled:
        cfg = ensure_standins(cfg)
    if features and cfg.data.use_cached_features and cfg.features.splits:
        ensure_feature_cache(cfg)
    return cfg


def make_synthetic_world(cfg: RunConfig) -> RunConfig:
    """Write the synthetic world's splits to ``data_dir`` once (a marker file says it is complete)."""
    from .data.synthetic import write_synthetic_shards

    out = cfg.data_dir
    marker = out / _DONE
    record = json.dumps(to_dict(cfg.synthetic), sort_keys=True)
    if not (marker.is_file() and marker.read_text() == record):
        if _rank() == 0:
            start = time.perf_counter()
            sizes = cfg.synthetic.split_sizes
            _log(f"synthetic world: writing {sizes} images of {cfg.synthetic.image_size} px to {out}")
            write_synthetic_shards(cfg.synthetic, out)
            marker.write_text(record)
            _log(f"synthetic world: done in {time.perf_counter() - start:.1f} s")
        _barrier()
    data = cfg.data
    data = replace(
        data,
        train_shards=data.train_shards or str(out / "train-*.tar"),
        val_shards=data.val_shards or str(out / "val-*.tar"),
        test_shards=data.test_shards or str(out / "test-*.tar"),
    )
    return replace(cfg, data=data)


def ensure_standins(cfg: RunConfig) -> RunConfig:
    """Train (rank 0) or reuse the stand-in backbones and point ``model.vision``/``model.lm`` at them."""
    if _rank() == 0:
        paths = ensure_standin_backbones(cfg.standin, cfg.standin_dir, lambda: _standin_pairs(cfg), log=_log)
    _barrier()
    if _rank() != 0:
        paths = ensure_standin_backbones(cfg.standin, cfg.standin_dir, lambda: _standin_pairs(cfg), log=lambda m: None)
    model = cfg.model
    model = replace(
        model,
        vision=replace(model.vision, name=paths["vision_name"], pretrained=paths["vision_pretrained"]),
        lm=replace(model.lm, name_or_path=paths["lm_dir"]),
    )
    return replace(cfg, model=model)


def _standin_pairs(cfg: RunConfig) -> tuple[torch.Tensor, list[list[str]]]:
    """The training split in memory: preprocessed images (N, 3, H, W) and every caption of each."""
    import open_clip

    from .data.reader import CaptionLoader

    if not cfg.data.train_shards:
        raise ValueError("standin.enabled needs training shards: set data.train_shards or make_synthetic: true")
    size = cfg.standin.vision.image_size
    read = replace(cfg.data, use_cached_features=False, batch_size=512, num_workers=0, image_size=size)
    loader = CaptionLoader(cfg.data.train_shards, read, transform=open_clip.image_transform(size, False), train=False)
    images, captions = [], []
    for batch in loader:
        images.append(batch["images"])
        captions += batch.references
    return torch.cat(images), captions


def ensure_feature_cache(cfg: RunConfig) -> None:
    """Encode each split in ``features.splits`` once with the frozen tower (rank 0; others wait)."""
    from .data.features import precompute_features
    from .vision import VisionTower, load_open_clip

    todo = [s for s in cfg.features.splits if not (cfg.features_dir / f"{s}-features.json").is_file()]
    if todo and _rank() == 0:
        vision_model, preprocess = load_open_clip(cfg.model.vision)
        tower = VisionTower(vision_model, cfg.model.vision, preprocess)
        read = replace(cfg.data, batch_size=cfg.features.batch_size, use_cached_features=False)
        for split in todo:
            source = _raw_split_spec(cfg, split)
            start = time.perf_counter()
            summary = precompute_features(
                source,
                cfg.features_dir,
                tower,
                read,
                prefix=split,
                transform=preprocess,
                description={"name": cfg.model.vision.name, "pretrained": cfg.model.vision.pretrained,
                             "layer": cfg.model.vision.layer, "keep_cls": cfg.model.vision.keep_cls},
            )  # fmt: skip
            seconds = time.perf_counter() - start
            _log(f"feature cache: {split}: {summary.num_samples} images in {seconds:.1f} s -> {cfg.features_dir}")
    _barrier()


def _raw_split_spec(cfg: RunConfig, split: str) -> str:
    spec = {"train": cfg.data.train_shards, "val": cfg.data.val_shards, "test": cfg.data.test_shards}.get(split)
    if spec:
        return spec
    guess = cfg.data_dir / f"{split}-*.tar"
    if list(guess.parent.glob(guess.name)):
        return str(guess)
    raise ValueError(f"no shards for split {split!r}: set data.{split}_shards (known splits: train, val, test)")


def split_spec(cfg: RunConfig, split: str) -> str:
    """The shards a split is read from: the feature cache when ``data.use_cached_features`` and the
    split was cached, else the raw shards."""
    if cfg.data.use_cached_features and split in cfg.features.splits:
        return str(cfg.features_dir / f"{split}-*.tar")
    return _raw_split_spec(cfg, split)


def build_model(cfg: RunConfig):
    from .model import VisionLanguageModel

    set_seed(cfg.seed)
    return VisionLanguageModel.from_config(cfg.model)


def train_loader(cfg: RunConfig, model):
    from .data.reader import CaptionLoader

    return CaptionLoader(
        split_spec(cfg, "train"),
        cfg.data,
        transform=model.vision.preprocess,
        text=model.processor,
        prompt=model.config.caption_prompt,
        train=True,
    )


def run_training(cfg: RunConfig, model=None):
    """Train and write ``<output_dir>/adapter`` (the adapter-only checkpoint) on rank 0."""
    model = build_model(cfg) if model is None else model
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_train / 1e6:.3f} M trainable of {n_all / 1e6:.2f} M parameters")
    if _rank() == 0:
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.out / "run_config.yaml")
    start = time.perf_counter()
    result = train(model, train_loader(cfg, model), cfg.train, cfg.out, seed=cfg.seed, run_config=to_dict(cfg))
    seconds = time.perf_counter() - start
    if _rank() == 0 and result.step == cfg.train.max_steps:
        model.save_adapter(cfg.out / "adapter")
    tail = result.losses[-20:] or [float("nan")]
    _log(f"train: {result.step} steps, last loss {sum(tail) / len(tail):.4f}, {seconds:.1f} s this call")
    return model, result


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def run_evaluation(cfg: RunConfig, model, *, log=_log) -> dict[str, Any]:
    """Caption every split in ``eval.splits`` and score it; with ``eval.ablation`` also caption the
    same images with the image input removed (prompt only). Writes ``eval/<split>.json`` (metrics +
    predictions), ``eval/<split>_samples.png`` and ``eval/metrics.json``; returns the metrics."""
    from . import evaluation as ev
    from .data.reader import CaptionLoader

    out = cfg.out / "eval"
    summary: dict[str, Any] = {}
    gen = {"max_new_tokens": cfg.eval.max_new_tokens, "num_beams": cfg.eval.num_beams}
    for split in cfg.eval.splits:
        read = replace(cfg.data, batch_size=cfg.eval.batch_size, num_workers=0)

        def loader(split=split, read=read):
            return CaptionLoader(
                split_spec(cfg, split),
                read,
                transform=model.vision.preprocess,
                train=False,
                keep_pixels=cfg.eval.grid_samples > 0,
            )

        start = time.perf_counter()
        preds, refs, meta, pixels = ev.generate_captions(model, loader(), max_images=cfg.eval.max_samples, **gen)
        seconds = time.perf_counter() - start
        if not preds:
            raise ValueError(f"eval: split {split!r} ({split_spec(cfg, split)}) has no samples")
        metrics = ev.evaluate_captions(preds, refs, meta, synthetic=cfg.synthetic, tokenizer=cfg.eval.metrics_tokenizer)
        metrics["images_per_s"] = len(preds) / seconds
        if cfg.eval.ablation:
            ablated, *_ = ev.generate_captions(
                model, loader(), ablate_images=True, max_images=cfg.eval.max_samples, **gen
            )
            metrics["no_image"] = ev.evaluate_captions(
                ablated, refs, meta, synthetic=cfg.synthetic, tokenizer=cfg.eval.metrics_tokenizer
            )
            metrics["no_image"]["example"] = next(iter(ablated.values()))
        ev.write_results(out / f"{split}.json", preds, refs, metrics, {"split": split})
        keys = list(preds)
        if cfg.eval.grid_samples and pixels:
            shown = [k for k in keys if k in pixels][: cfg.eval.grid_samples]
            ev.save_caption_grid(
                out / f"{split}_samples.png", [pixels[k] for k in shown], [preds[k] for k in shown],
                [refs[k] for k in shown], titles=shown,
            )  # fmt: skip
        summary[split] = metrics
        log(format_split_report(split, metrics, keys, preds, refs, cfg.eval.print_samples))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_split_report(split: str, metrics: dict[str, Any], keys, preds, refs, n_samples: int) -> str:
    lines = [f"== {split}: {len(preds)} held-out images =="]
    lines += _metric_lines("with image", metrics)
    if "no_image" in metrics:
        lines += _metric_lines("image removed", metrics["no_image"])
        base = metrics["no_image"]["CIDEr"]
        ratio = metrics["CIDEr"] / base if base > 0 else float("inf")
        lines.append(
            f"  CIDEr with image / image removed: {ratio:.1f}x   (image removed says: {metrics['no_image']['example']!r})"
        )
    for k in keys[:n_samples]:
        lines.append(f"  {k}: generated {preds[k]!r}")
        lines.append(f"  {' ' * len(k)}  reference {refs[k][0]!r}")
    return "\n".join(lines)


def _metric_lines(label: str, metrics: dict[str, Any]) -> list[str]:
    lines = [
        f"  {label:>13}: CIDEr {metrics['CIDEr']:.3f}  BLEU-4 {metrics['BLEU-4']:.3f}  ROUGE-L {metrics['ROUGE-L']:.3f}"
    ]
    for group, row in (metrics.get("attribute_accuracy") or {}).items():
        name = {"1": "1 object", "2": "2 objects", "3": "3 objects"}.get(group, group)
        lines.append(
            f"  {'':>13}  {name:>9} ({row['images']:>3} images): attributes {row['attributes']:.1%}  "
            f"[colour {row['colour']:.1%}, shape {row['shape']:.1%}, position {row['position']:.1%}, "
            f"size {row['size']:.1%}, count {row['object_count']:.1%}]"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Loading a trained adapter


def load_trained(cfg: RunConfig, adapter: str | Path | None = None):
    """The VLM of a finished run: base parts from the adapter's manifest, adapter weights strictly."""
    from .model import VisionLanguageModel

    if cfg.standin.enabled:
        register_standin_vision(cfg.standin_dir / "vision")
    path = Path(adapter) if adapter else cfg.out / "adapter"
    if not path.is_dir():
        raise ValueError(f"no adapter at {path}: train first (pvlm-train) or pass --adapter")
    return VisionLanguageModel.load_adapter(path)


# ----------------------------------------------------------------------------------------------
# Commands


def _parse(argv, description: str, default: Path | None = None, extra=None) -> tuple[RunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=default, help="RunConfig YAML (see configs/)")
    if extra is not None:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    cfg = load_config(RunConfig, args.config, overrides) if args.config else parse_cli(RunConfig, overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg, args


def main_make_shards(argv: list[str] | None = None) -> None:
    from .data import shards as sh

    cfg, _ = _parse(
        argv, "Write webdataset shards: the synthetic world, a folder + captions file, or img2dataset output."
    )
    src = cfg.shards
    if src.source == "synthetic":
        make_synthetic_world(replace(cfg, make_synthetic=True))
        return
    if not src.input_dir:
        raise ValueError(f"shards.source={src.source!r} needs shards.input_dir")
    if src.source == "folder":
        if not src.captions_file:
            raise ValueError("shards.source='folder' needs shards.captions_file (CSV or JSONL)")
        summary = sh.shards_from_folder(
            src.input_dir, src.captions_file, cfg.data_dir, src.prefix, src.samples_per_shard
        )
    else:
        summary = sh.shards_from_img2dataset(src.input_dir, cfg.data_dir, src.prefix, src.samples_per_shard)
    print(
        f"wrote {summary.num_samples} samples to {len(summary.shards)} shards in {cfg.data_dir}; skipped {summary.skipped}"
    )


def main_precompute_features(argv: list[str] | None = None) -> None:
    cfg, _ = _parse(argv, "Cache the frozen vision tower's patch features (fp16) as new shards.")
    prepare(replace(cfg, data=replace(cfg.data, use_cached_features=True)), features=True)


def main_train(argv: list[str] | None = None) -> None:
    init_distributed()
    cfg, _ = _parse(argv, "Train resampler + projection + LoRA on caption shards (torchrun for N processes).")
    run_training(prepare(cfg))


def main_eval(argv: list[str] | None = None) -> None:
    def extra(p):
        p.add_argument("--adapter", type=Path, default=None, help="adapter dir (default <output_dir>/adapter)")

    cfg, args = _parse(
        argv, "Evaluate a trained adapter: CIDEr, BLEU-4, attribute accuracy, the no-image ablation.", extra=extra
    )
    cfg = prepare(cfg)
    run_evaluation(cfg, load_trained(cfg, args.adapter))


def main_caption(argv: list[str] | None = None) -> None:
    from PIL import Image

    def extra(p):
        p.add_argument("--adapter", type=Path, default=None, help="adapter dir (default <output_dir>/adapter)")
        p.add_argument("--images", nargs="+", required=True, help="image files to caption")

    cfg, args = _parse(argv, "Caption image files with a trained adapter.", extra=extra)
    model = load_trained(cfg, args.adapter)
    images = [Image.open(p).convert("RGB") for p in args.images]
    for path, text in zip(args.images, model.caption(images, max_new_tokens=cfg.eval.max_new_tokens)):
        print(f"{path}: {text}")


def main_demo(argv: list[str] | None = None) -> None:
    """The embedded default: world -> stand-in backbones -> feature cache -> train -> evaluate."""
    cfg, _ = _parse(
        argv, "The embedded default, offline: synthetic world, stand-in backbones, train, evaluate.", DEFAULT_CONFIG
    )
    start = time.perf_counter()
    cfg = prepare(cfg)
    _log(f"prepared in {time.perf_counter() - start:.1f} s")
    model, _ = run_training(cfg)
    _log(f"trained; {time.perf_counter() - start:.1f} s so far")
    run_evaluation(cfg, model)
    import resource

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    _log(
        f"demo done in {time.perf_counter() - start:.1f} s wall ({cpu.ru_utime + cpu.ru_stime:.1f} s CPU); "
        f"metrics in {cfg.out / 'eval' / 'metrics.json'}"
    )


# ----------------------------------------------------------------------------------------------


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":  # python -m vlm.cli <command> ...
    commands = {
        "make-shards": main_make_shards,
        "precompute-features": main_precompute_features,
        "train": main_train,
        "eval": main_eval,
        "caption": main_caption,
        "demo": main_demo,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m vlm.cli {{{','.join(commands)}}} [--config file.yaml] [overrides]")
    commands[sys.argv[1]](sys.argv[2:])
