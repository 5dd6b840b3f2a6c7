"""The evaluation step: caption every split, score it, write the results, print a report.

``pvlm-eval`` and ``pvlm-demo`` call `run_evaluation` on a trained VLM. The metrics are
`vlm.evaluation`'s; this module decides which splits, where the files go and what the report says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .. import evaluation as ev
from ..data.reader import CaptionLoader
from ..distributed import print0
from ..io import atomic_write
from .assets import split_spec
from .config import RunConfig

__all__ = ["run_evaluation", "format_split_report"]


@torch.no_grad()
def run_evaluation(cfg: RunConfig, model, *, log: Callable[[str], None] = print0) -> dict[str, Any]:
    """Caption every split in ``eval.splits`` and score it; with ``eval.ablation`` also caption the
    same images with the image input removed (prompt only). Writes ``eval/<split>.json`` (metrics +
    predictions), ``eval/<split>_samples.png`` and ``eval/metrics.json``; returns the metrics."""
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
    atomic_write(out / "metrics.json", json.dumps(summary, indent=1))
    return summary


def format_split_report(split: str, metrics: dict[str, Any], keys, preds, refs, n_samples: int) -> str:
    """The lines a command prints for one split: metrics with and without the image, sample captions."""
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
