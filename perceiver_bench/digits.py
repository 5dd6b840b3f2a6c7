"""B1 digits from raw pixels + 2D Fourier features (no convolution), and B2 the same with permuted pixels.

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes), optionally upsampled
bilinearly to ``length`` x ``length``; a stratified split with the config's seed. Each pixel is one
input token: [intensity in [0, 1] repeated ``value_copies`` times, Fourier features of its (row, col)
in [-1, 1]]. The copies are a fixed feature scaling, not a learned embedding: the cross-attention's
LayerNorm runs over the whole token, and a single intensity channel among 2 * (2K + 1) position
channels barely moves it (with one copy the smoke model stayed at chance for 300 steps).

B2 permutes the tokens with one fixed permutation *after* attaching positions. A Perceiver is
permutation-invariant over its inputs, so it learns exactly as well; a small CNN (conv -> pool ->
conv -> global pool) on the pixel-permuted images loses its locality prior and drops sharply.

Options: ``test_fraction`` (0.2), ``value_copies`` (8), ``cnn_steps`` (B2, default train.steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resampler.nn.position import FourierPositionEncoding

from .common import (
    RunContext,
    TaskResult,
    accuracy,
    majority_baseline,
    predict_in_batches,
    save_curve_plot,
    train_model,
    training_facts,
)
from .config import BenchConfig
from .models import make_classifier

B1_TARGET = ">= 96% test top-1"
B2_TARGET = "within 0.5 points of B1; CNN drops sharply"


def load_digit_images(cfg: BenchConfig) -> dict[str, Tensor]:
    """images (E, S, S) in [0, 1] and labels (E,), split into train/test with the config's seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (E, 8, 8)
    side = cfg.data.length or 8
    if side != 8:
        images = F.interpolate(images[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    labels = torch.tensor(digits.target)
    idx = np.arange(len(labels))
    test_fraction = float(cfg.data.options.get("test_fraction", 0.2))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=cfg.seed, stratify=labels)
    train_idx, test_idx = train_idx[: cfg.data.num_train], test_idx[: cfg.data.num_test]
    return {
        "train_images": images[train_idx],
        "train_labels": labels[train_idx],
        "test_images": images[test_idx],
        "test_labels": labels[test_idx],
    }


def pixel_tokens(images: Tensor, num_bands: int, value_copies: int = 8) -> Tensor:
    """(E, S, S) -> (E, S*S, copies + Fourier) tokens: intensity copies then position features, row-major."""
    e, s, _ = images.shape
    pos = FourierPositionEncoding((s, s), num_bands)(e)  # (E, S*S, F)
    values = images.reshape(e, s * s, 1).expand(-1, -1, value_copies)  # (E, S*S, copies)
    return torch.cat([values, pos], dim=-1)


def train_perceiver(
    cfg: BenchConfig, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int = 10
):
    torch.manual_seed(cfg.seed)
    model = make_classifier(cfg.model, train_x.shape[-1], num_classes)

    def loss_fn(idx: Tensor) -> Tensor:
        return F.cross_entropy(model(train_x[idx]), train_y[idx])

    def test_logits() -> Tensor:
        return predict_in_batches(lambda i: model(test_x[i]), len(test_x), cfg.train.eval_batch_size)

    gen = torch.Generator().manual_seed(cfg.seed)
    stats = train_model(
        model, loss_fn, len(train_x), cfg.train, gen, lambda: {"accuracy": accuracy(test_logits(), test_y)}
    )
    return model, stats, test_logits()


def run_digits(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    data = load_digit_images(cfg)
    nb, copies = cfg.model.num_bands, int(cfg.data.options.get("value_copies", 8))
    train_x, test_x = pixel_tokens(data["train_images"], nb, copies), pixel_tokens(data["test_images"], nb, copies)
    model, stats, logits = train_perceiver(cfg, train_x, data["train_labels"], test_x, data["test_labels"])
    acc = accuracy(logits, data["test_labels"])
    fig = save_curve_plot(
        stats.curve, "accuracy", f"B1 digits ({cfg.size})", ctx.figure_path(f"B1-digits-{cfg.size}.png")
    )
    return TaskResult(
        metric_name="test top-1",
        metric=acc,
        baseline_name="majority",
        baseline=majority_baseline(data["train_labels"], data["test_labels"]),
        target=B1_TARGET,
        target_met=acc >= 0.96,
        **training_facts(model, stats, [fig]),
        extra={"image_side": data["train_images"].shape[-1], "tokens": train_x.shape[1], "test_examples": len(test_x)},
    )


class SmallCNN(nn.Module):
    """conv3x3 -> ReLU -> maxpool -> conv3x3 -> ReLU -> global average pool -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(images[:, None])), 2)  # (B, W, S/2, S/2)
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))  # (B, 2W)
        return self.head(x)


def train_cnn(cfg: BenchConfig, train_images: Tensor, train_y: Tensor, test_images: Tensor, test_y: Tensor) -> float:
    torch.manual_seed(cfg.seed)
    model = SmallCNN()
    gen = torch.Generator().manual_seed(cfg.seed)
    train_cfg = type(cfg.train)(**{**cfg.train.__dict__, "lr": 3e-3, "eval_every": 0})
    train_cfg.steps = int(cfg.data.options.get("cnn_steps", cfg.train.steps))
    train_model(
        model, lambda idx: F.cross_entropy(model(train_images[idx]), train_y[idx]), len(train_images), train_cfg, gen
    )
    logits = predict_in_batches(lambda i: model(test_images[i]), len(test_images), cfg.train.eval_batch_size)
    return accuracy(logits, test_y)


def run_permuted_digits(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    data = load_digit_images(cfg)
    nb, copies = cfg.model.num_bands, int(cfg.data.options.get("value_copies", 8))
    train_x, test_x = pixel_tokens(data["train_images"], nb, copies), pixel_tokens(data["test_images"], nb, copies)
    num_tokens = train_x.shape[1]
    perm = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(cfg.seed + 7))
    model, stats, logits = train_perceiver(
        cfg, train_x[:, perm], data["train_labels"], test_x[:, perm], data["test_labels"]
    )
    acc = accuracy(logits, data["test_labels"])
    unpermuted_logits = predict_in_batches(lambda i: model(test_x[i]), len(test_x), cfg.train.eval_batch_size)
    logit_diff = float((unpermuted_logits - logits).abs().max())

    side = data["train_images"].shape[-1]

    def scramble(images: Tensor) -> Tensor:
        return images.reshape(len(images), -1)[:, perm].reshape(len(images), side, side)

    cnn_plain = train_cnn(cfg, data["train_images"], data["train_labels"], data["test_images"], data["test_labels"])
    cnn_perm = train_cnn(
        cfg, scramble(data["train_images"]), data["train_labels"], scramble(data["test_images"]), data["test_labels"]
    )
    b1_acc = _b1_accuracy(ctx, cfg.size)
    within = None if b1_acc is None else abs(acc - b1_acc) <= 0.005
    fig = save_curve_plot(
        stats.curve,
        "accuracy",
        f"B2 permuted digits ({cfg.size})",
        ctx.figure_path(f"B2-permuted-digits-{cfg.size}.png"),
    )
    return TaskResult(
        metric_name="test top-1 (permuted)",
        metric=acc,
        baseline_name="majority",
        baseline=majority_baseline(data["train_labels"], data["test_labels"]),
        target=B2_TARGET,
        target_met=within is not False and cnn_plain - cnn_perm >= 0.05,
        **training_facts(model, stats, [fig]),
        extra={
            "b1_accuracy_same_size": b1_acc,
            "accuracy_on_unpermuted_inputs": accuracy(unpermuted_logits, data["test_labels"]),
            "max_logit_diff_permuted_vs_unpermuted": logit_diff,
            "cnn_accuracy_plain": cnn_plain,
            "cnn_accuracy_permuted": cnn_perm,
        },
    )


def _b1_accuracy(ctx: RunContext, size: str) -> float | None:
    """B1's accuracy at the same size from its last record, if any (for the 'within 0.5 points' check)."""
    for folder in ctx.record_dirs:
        path = Path(folder) / f"digits-{size}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["metric"])
    return None


RUNNERS = {"digits": run_digits, "permuted_digits": run_permuted_digits}
