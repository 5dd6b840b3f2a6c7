"""Validation while training: the validation loss every ``train.eval_every`` steps, and CIDEr on a sample.

`make_validator` returns the ``validate(step)`` callback `vlm.training.train` calls, or None when
``train.eval_every`` is 0. The loss is read from the ``val`` split (``data.val_shards``, or its feature
cache when the run reads cached features) with the training prompt and tokenization, each rank its own
share, averaged per label token over all ranks (`vlm.training.validation.validation_loss`); at most
``train.eval_batches`` batches per pass. With ``train.eval_cider_samples`` rank 0 also captions that
many validation images (greedy, ``eval.max_new_tokens``) and scores CIDEr against all their references
with the Java-free tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .. import evaluation as ev
from ..data.reader import CaptionLoader
from ..distributed import rank
from ..training.validation import validation_loss
from .assets import split_spec
from .config import RunConfig

__all__ = ["make_validator"]


def make_validator(cfg: RunConfig, model) -> Callable[[int], dict[str, float]] | None:
    if not cfg.train.eval_every:
        return None
    try:
        spec = split_spec(cfg, "val")
    except ValueError:
        raise ValueError(
            "train.eval_every needs a validation split: set data.val_shards (or train.eval_every=0)"
        ) from None
    read = replace(cfg.data, num_workers=0)

    def loader(**kwargs) -> CaptionLoader:
        return CaptionLoader(spec, read, transform=model.vision.preprocess, train=False, **kwargs)

    def validate(step: int) -> dict[str, float]:
        text = {"text": model.processor, "prompt": model.config.caption_prompt}
        metrics = {"loss": validation_loss(model, loader(**text), cfg.train.eval_batches)}
        if cfg.train.eval_cider_samples and rank() == 0:
            preds, refs, _, _ = ev.generate_captions(
                model, loader(), max_images=cfg.train.eval_cider_samples, max_new_tokens=cfg.eval.max_new_tokens
            )
            metrics["CIDEr"] = ev.caption_metrics(preds, refs, tokenizer="simple", meteor=False)["CIDEr"]
        return metrics

    return validate
