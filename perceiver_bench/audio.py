"""B4: synthetic raw audio, multi-label event tagging (an AudioSet stand-in), scored by mAP.

Each clip of ``length`` samples (8 kHz) mixes 1-3 events of 8 kinds (low tone, high tone, rising
chirp, falling chirp, noise burst, click train, square wave, damped pluck train) at random onsets,
durations and gains, over faint background noise. Inputs: the library's ``AudioPreprocessor``
(patches of ``samples_per_patch`` raw samples + 1D Fourier positions); outputs: 8 sigmoid logits.
Trivial baseline: every clip scored with the training-set class frequencies (mAP = prevalence).

Options: ``samples_per_patch`` (32), ``max_events`` (3).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from resampler.models.preprocessors import AudioPreprocessor

from .common import (
    RunContext,
    TaskResult,
    mean_average_precision,
    predict_in_batches,
    save_curve_plot,
    train_model,
    training_facts,
)
from .config import BenchConfig
from .models import make_classifier

TARGET = "mAP >= 0.80"
EVENTS = ("low_tone", "high_tone", "chirp_up", "chirp_down", "noise_burst", "click_train", "square", "pluck")
SAMPLE_RATE = 8000


def event_waveform(kind: int, n: int, gen: torch.Generator) -> Tensor:
    """(n,) samples of one event of class ``kind``, peak amplitude about 1."""
    t = torch.arange(n) / SAMPLE_RATE
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731
    phase = u(0, 2 * math.pi)
    name = EVENTS[kind]
    if name == "low_tone":
        return torch.sin(2 * math.pi * u(150, 350) * t + phase)
    if name == "high_tone":
        return torch.sin(2 * math.pi * u(1800, 2800) * t + phase)
    if name in ("chirp_up", "chirp_down"):
        f0, f1 = (u(200, 500), u(1500, 2500)) if name == "chirp_up" else (u(1500, 2500), u(200, 500))
        dur = max(n / SAMPLE_RATE, 1e-3)
        return torch.sin(2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * dur)) + phase)
    if name == "noise_burst":
        return torch.randn(n, generator=gen).clamp(-3, 3) / 2
    if name == "click_train":
        out = torch.zeros(n)
        period = int(u(0.008, 0.02) * SAMPLE_RATE)
        out[int(u(0, period)) :: period] = 1.0
        return out
    if name == "square":
        return torch.sign(torch.sin(2 * math.pi * u(300, 600) * t + phase)) * 0.7
    if name == "pluck":
        period = int(u(0.03, 0.06) * SAMPLE_RATE)
        local = (torch.arange(n) % period) / SAMPLE_RATE
        return torch.sin(2 * math.pi * u(800, 1200) * local) * torch.exp(-local * 150)
    raise ValueError(f"unknown event {kind}")


def make_clips(cfg: BenchConfig, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """audio (count, S), multi-hot labels (count, 8)."""
    gen = torch.Generator().manual_seed(seed)
    n, k = cfg.data.length, len(EVENTS)
    max_events = int(cfg.data.options.get("max_events", 3))
    audio, labels = torch.zeros(count, n), torch.zeros(count, k)
    for i in range(count):
        num = int(torch.randint(1, max_events + 1, (), generator=gen))
        for kind in torch.randperm(k, generator=gen)[:num].tolist():
            dur = int(n * (0.3 + 0.7 * float(torch.rand((), generator=gen))))
            start = int(torch.randint(0, n - dur + 1, (), generator=gen))
            gain = 0.3 + 0.7 * float(torch.rand((), generator=gen))
            audio[i, start : start + dur] += gain * event_waveform(kind, dur, gen)
            labels[i, kind] = 1.0
    audio += 0.02 * torch.randn(audio.shape, generator=gen)
    return audio, labels


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    train_a, train_y = make_clips(cfg, cfg.data.num_train, cfg.seed)
    test_a, test_y = make_clips(cfg, cfg.data.num_test, cfg.seed + 1)
    spp = int(cfg.data.options.get("samples_per_patch", 32))
    pre = AudioPreprocessor(spp, num_bands=cfg.model.num_bands, num_samples=cfg.data.length // spp)
    train_x, test_x = pre(train_a).features, pre(test_a).features
    model = make_classifier(cfg.model, pre.out_dim, len(EVENTS))

    def test_scores() -> Tensor:
        return predict_in_batches(lambda i: model(test_x[i]), len(test_x), cfg.train.eval_batch_size).sigmoid()

    def evaluate() -> dict[str, float]:
        return {"mAP": mean_average_precision(test_scores().numpy(), test_y.numpy())}

    gen = torch.Generator().manual_seed(cfg.seed)
    stats = train_model(
        model,
        lambda idx: F.binary_cross_entropy_with_logits(model(train_x[idx]), train_y[idx]),
        len(train_x),
        cfg.train,
        gen,
        evaluate,
    )
    scores = test_scores().numpy()
    m_ap = mean_average_precision(scores, test_y.numpy())
    prior = np.broadcast_to(train_y.mean(0).numpy(), test_y.shape)
    baseline = mean_average_precision(
        prior + 1e-9 * np.random.default_rng(cfg.seed).random(test_y.shape), test_y.numpy()
    )
    from sklearn.metrics import average_precision_score

    per_class = {
        EVENTS[c]: float(average_precision_score(test_y[:, c].numpy(), scores[:, c])) for c in range(len(EVENTS))
    }
    fig = save_curve_plot(
        stats.curve, "mAP", f"B4 synthetic audio ({cfg.size})", ctx.figure_path(f"B4-audio-{cfg.size}.png")
    )
    return TaskResult(
        metric_name="test mAP",
        metric=m_ap,
        baseline_name="class priors",
        baseline=baseline,
        target=TARGET,
        target_met=m_ap >= 0.80,
        **training_facts(model, stats, [fig]),
        extra={"samples": cfg.data.length, "patches": train_x.shape[1], "per_class_ap": per_class},
    )


RUNNERS = {"audio": run}
