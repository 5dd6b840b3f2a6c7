"""Validation during training: the token-weighted loss over held-out batches, with the RNG left as it was.

`validation_loss` runs ``model(**batch)`` in eval mode without gradients over a loader (each rank its
own share of the split) and returns the loss averaged over every label token of every rank, so N
processes report the same number as one. `preserved_rng` restores python's, numpy's and torch's
generators (CPU and CUDA) afterwards: a validation pass, whatever it draws, leaves the training run
bit-identical to one without validation.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import gather_objects

__all__ = ["preserved_rng", "validation_loss"]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block, then put every random generator back where it was."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[dict[str, Any]], max_batches: int = 0) -> float:
    """Mean loss per label token over ``batches`` (at most ``max_batches``; 0 = all) and all ranks.

    Each batch's ``.loss`` (a mean over its label tokens, the Hugging Face convention) is weighted by
    its number of label tokens (labels != -100 after the one-token shift); batches without ``labels``
    count once per sample.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = float(model(**batch).loss)
            labels = batch.get("labels")
            n = (
                int((labels[:, 1:] != -100).sum())
                if isinstance(labels, torch.Tensor)
                else len(next(iter(batch.values())))
            )
            total, count = total + loss * n, count + n
    finally:
        model.train(was_training)
    parts = gather_objects((total, count))
    total, count = sum(t for t, _ in parts), sum(c for _, c in parts)
    if count == 0:
        raise ValueError("validation: the validation split gave no batch with a label token")
    return total / count
