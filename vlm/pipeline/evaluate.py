"""The evaluation step: caption every split in the COCO protocol, score it, write the results, print a report.

``pvlm-eval`` and ``pvlm-demo`` call `run_evaluation` on a trained VLM; ``pvlm-eval`` with
``eval.results_file`` calls `score_results` (no model). The metrics are `vlm.evaluation`'s and the
COCO file formats `vlm.data.coco`'s; this module decides which splits, where the files go and what
the report says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import evaluation as ev
from ..data.coco import coco_annotations, coco_image_ids, coco_results
from ..data.reader import CaptionLoader
from ..distributed import print0
from ..io import atomic_write
from .assets import split_spec
from .config import RunConfig

__all__ = ["run_evaluation", "score_results", "format_split_report"]


@torch.no_grad()
def run_evaluation(cfg: RunConfig, model, *, log: Callable[[str], None] = print0) -> dict[str, Any]:
    """Caption every image of each split in ``eval.splits`` once and score it against all its references;
    with ``eval.ablation`` also caption the same images with the image input removed (prompt only).

    Writes, under ``<output_dir>/eval/``: ``<split>.coco_results.json`` (COCO's results format),
    ``<split>.coco_annotations.json`` (the references in COCO's layout), ``<split>.json`` (metrics +
    predictions), ``<split>_samples.png`` and ``metrics.json``; returns the metrics. A split whose
    images have no reference (NoCaps test) gets its results file only, for the benchmark's server.
    """
    out = cfg.out / "eval"
    summary: dict[str, Any] = {}
    gen = {"max_new_tokens": cfg.eval.max_new_tokens, "num_beams": cfg.eval.num_beams}
    scoring = {"tokenizer": cfg.eval.metrics_tokenizer, "meteor": cfg.eval.meteor, "progress": cfg.eval.progress}
    for split in cfg.eval.splits:
        read = replace(cfg.data, batch_size=cfg.eval.batch_size, num_workers=0)

        def loader(split=split, read=read):
            return CaptionLoader(
                split_spec(cfg, split),
                read,
                transform=model.vision.preprocess,
                train=False,
                keep_pixels=cfg.eval.grid_samples > 0,
                allow_uncaptioned=True,
            )

        start = time.perf_counter()
        preds, refs, meta, pixels = ev.generate_captions(
            model, loader(), max_images=cfg.eval.max_samples, progress=cfg.eval.progress, **gen
        )
        seconds = time.perf_counter() - start
        if not preds:
            raise ValueError(f"eval: split {split!r} ({split_spec(cfg, split)}) has no samples")
        ids = coco_image_ids(list(preds), meta)
        results_file = atomic_write(out / f"{split}.coco_results.json", json.dumps(coco_results(preds, ids)))
        scored = {k: p for k, p in preds.items() if refs[k]}
        if not scored:
            metrics: dict[str, Any] = {"num_images": len(preds), "images_per_s": len(preds) / seconds}
            metrics["note"] = f"no references in this split: submit {results_file} to the benchmark's server"
        else:
            annotations = coco_annotations(
                refs, {k: ids[k] for k in scored}, f"split {split} of {split_spec(cfg, split)}"
            )
            atomic_write(out / f"{split}.coco_annotations.json", json.dumps(annotations, ensure_ascii=False))
            metrics = ev.evaluate_captions(scored, refs, meta, synthetic=cfg.synthetic, **scoring)
            metrics["images_per_s"] = len(preds) / seconds
            if len(scored) < len(preds):
                metrics["images_without_reference"] = len(preds) - len(scored)
        if cfg.eval.ablation and scored:
            ablated, *_ = ev.generate_captions(
                model, loader(), ablate_images=True, max_images=cfg.eval.max_samples, progress=cfg.eval.progress, **gen
            )
            ablated = {k: ablated[k] for k in scored}
            metrics["no_image"] = ev.evaluate_captions(ablated, refs, meta, synthetic=cfg.synthetic, **scoring)
            metrics["no_image"]["example"] = next(iter(ablated.values()))
        metrics["results_file"] = str(results_file)
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
    atomic_write(out / "metrics.json", json.dumps(summary, indent=1))
    return summary


def score_results(cfg: RunConfig, *, log: Callable[[str], None] = print0) -> dict[str, Any]:
    """``pvlm-eval eval.results_file=... eval.annotations_file=...``: score an existing COCO results
    file (ours or a published one) and write ``<output_dir>/eval/<results name>.metrics.json``."""
    results = Path(cfg.eval.results_file)
    metrics = ev.score_coco_results(
        results,
        cfg.eval.annotations_file,
        tokenizer=cfg.eval.metrics_tokenizer,
        meteor=cfg.eval.meteor,
        progress=cfg.eval.progress,
    )
    name = results.name.removesuffix(".json")
    metrics.update(results_file=str(results), annotations_file=str(cfg.eval.annotations_file))
    atomic_write(cfg.out / "eval" / f"{name}.metrics.json", json.dumps(metrics, indent=1))
    lines = [f"== {results.name}: {metrics['num_images']} images against {cfg.eval.annotations_file} =="]
    lines += _metric_lines("results file", metrics)
    if metrics["images_without_prediction"]:
        lines.append(f"  ({metrics['images_without_prediction']} annotated images have no prediction: not scored)")
    log("\n".join(lines))
    return metrics


def format_split_report(split: str, metrics: dict[str, Any], keys, preds, refs, n_samples: int) -> str:
    """The lines a command prints for one split: metrics with and without the image, sample captions."""
    lines = [f"== {split}: {len(preds)} held-out images =="]
    if "CIDEr" not in metrics:
        lines.append(f"  {metrics.get('note', 'not scored')}")
    else:
        lines += _metric_lines("with image", metrics)
    if "no_image" in metrics:
        lines += _metric_lines("image removed", metrics["no_image"])
        base = metrics["no_image"]["CIDEr"]
        ratio = metrics["CIDEr"] / base if base > 0 else float("inf")
        lines.append(
            f"  CIDEr with image / image removed: {ratio:.1f}x   (image removed says: {metrics['no_image']['example']!r})"
        )
    if metrics.get("images_without_reference"):
        lines.append(f"  {metrics['images_without_reference']} images have no reference caption: not scored")
    if "results_file" in metrics:
        lines.append(f"  COCO results file: {metrics['results_file']}")
    for k in keys[:n_samples]:
        lines.append(f"  {k}: generated {preds[k]!r}")
        if refs[k]:
            lines.append(f"  {' ' * len(k)}  reference {refs[k][0]!r}")
    return "\n".join(lines)


def _metric_lines(label: str, metrics: dict[str, Any]) -> list[str]:
    meteor = f"  METEOR {metrics['METEOR']:.3f}" if "METEOR" in metrics else ""
    lines = [
        f"  {label:>13}: CIDEr {metrics['CIDEr']:.3f}  BLEU-4 {metrics['BLEU-4']:.3f}  ROUGE-L {metrics['ROUGE-L']:.3f}"
        + meteor
    ]
    for domain, row in (metrics.get("by_domain") or {}).items():
        lines.append(f"  {'':>13}  {domain:>11}: CIDEr {row['CIDEr']:.3f}  BLEU-4 {row['BLEU-4']:.3f}")
    for group, row in (metrics.get("attribute_accuracy") or {}).items():
        name = {"1": "1 object", "2": "2 objects", "3": "3 objects"}.get(group, group)
        lines.append(
            f"  {'':>13}  {name:>9} ({row['images']:>3} images): attributes {row['attributes']:.1%}  "
            f"[colour {row['colour']:.1%}, shape {row['shape']:.1%}, position {row['position']:.1%}, "
            f"size {row['size']:.1%}, count {row['object_count']:.1%}]"
        )
    return lines
