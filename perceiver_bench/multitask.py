"""B9: multi-task queries on digits (Perceiver IO's multi-task GLUE queries stand-in).

One Perceiver IO reads the digit (pixels + Fourier features, as in B1) once; its decoder has one
learned query per task, and each query's output row gives that task's logits. Tasks: the digit
(10 classes), its parity (2) and whether it is >= 5 (2). Each task is compared with a single-task
Perceiver classifier of the same encoder size trained for the same number of steps.

Options: as B1 (``value_copies``, ``test_fraction``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resampler.models.decoders import LearnedQueries
from resampler.models.perceiver_io import PerceiverIO

from .common import (
    RunContext,
    TaskResult,
    accuracy,
    predict_in_batches,
    save_curve_plot,
    train_model,
    training_facts,
)
from .config import BenchConfig
from .digits import load_digit_images, pixel_tokens, train_perceiver
from .models import encoder_config, make_decoder

TARGET = "each task within 2 points of its single-task model"
TASKS = {"digit": (10, lambda y: y), "parity": (2, lambda y: y % 2), "ge5": (2, lambda y: (y >= 5).long())}


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    data = load_digit_images(cfg)
    nb, copies = cfg.model.num_bands, int(cfg.data.options.get("value_copies", 8))
    train_x, test_x = pixel_tokens(data["train_images"], nb, copies), pixel_tokens(data["test_images"], nb, copies)
    train_t = {n: f(data["train_labels"]) for n, (_, f) in TASKS.items()}
    test_t = {n: f(data["test_labels"]) for n, (_, f) in TASKS.items()}
    mc = cfg.model
    decoder = make_decoder(
        mc, mc.latent_dim, max(k for k, _ in TASKS.values()), LearnedQueries(len(TASKS), mc.latent_dim)
    )
    model = PerceiverIO(encoder_config(mc, train_x.shape[-1]), decoder)

    def task_logits(out: Tensor) -> dict[str, Tensor]:
        return {n: out[:, i, :k] for i, (n, (k, _)) in enumerate(TASKS.items())}  # (B, K_task) each

    def loss_fn(idx: Tensor) -> Tensor:
        logits = task_logits(model(train_x[idx]))
        return sum(F.cross_entropy(logits[n], train_t[n][idx]) for n in TASKS)

    def test_accuracies() -> dict[str, float]:
        out = predict_in_batches(lambda i: model(test_x[i]), len(test_x), cfg.train.eval_batch_size)
        return {f"{n}_accuracy": accuracy(lg, test_t[n]) for n, lg in task_logits(out).items()}

    gen = torch.Generator().manual_seed(cfg.seed)
    stats = train_model(model, loss_fn, len(train_x), cfg.train, gen, test_accuracies)
    multi = test_accuracies()
    single = {}
    for n in TASKS:
        _, _, logits = train_perceiver(cfg, train_x, train_t[n], test_x, test_t[n], num_classes=TASKS[n][0])
        single[n] = accuracy(logits, test_t[n])
    gaps = {n: single[n] - multi[f"{n}_accuracy"] for n in TASKS}
    worst = max(gaps.values())
    fig = save_curve_plot(
        stats.curve,
        "digit_accuracy",
        f"B9 multi-task queries ({cfg.size})",
        ctx.figure_path(f"B9-multitask-{cfg.size}.png"),
    )
    return TaskResult(
        metric_name="worst gap to single-task (points)",
        metric=100 * worst,
        baseline_name="target",
        baseline=2.0,
        target=TARGET,
        target_met=worst <= 0.02,
        higher_is_better=False,
        **training_facts(model, stats, [fig]),
        extra={
            "multi_task_accuracy": multi,
            "single_task_accuracy": single,
            "majority_accuracy": {
                n: float((test_t[n] == torch.bincount(train_t[n]).argmax()).float().mean()) for n in TASKS
            },
        },
    )


RUNNERS = {"multitask": run}
