"""B7: synthetic optical flow (a Sintel / KITTI stand-in): warped random textures, EPE vs zero flow.

Frame 1 is a random smooth texture (Gaussian blobs + sinusoids) of ``length`` x ``length``; frame 2
is frame 1 warped by a smooth global flow (translation up to ``max_shift`` px, small rotation and
zoom). As in Perceiver IO's flow model, every pixel's input is the 3x3 patch of both frames around
it plus Fourier features of its position, and the same per-pixel features are the decoder's queries
(``PerceiverIO(queries_from_inputs=True)``); the output is (u, v) per pixel. Training decodes a random
subset of ``train_queries`` pixels per step (subsampled decoding); testing decodes all of them.

Metric: end-point error (mean L2 of the flow error, px); baseline: the zero-flow prediction.
Options: ``max_shift`` (2.0), ``train_queries`` (128).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from resampler.models.perceiver_io import PerceiverIO
from resampler.nn.position import FourierPositionEncoding

from .common import (
    RunContext,
    TaskResult,
    predict_in_batches,
    save_curve_plot,
    train_model,
    training_facts,
)
from .config import BenchConfig
from .models import encoder_config, make_decoder

TARGET = "EPE <= 0.5x the zero-flow baseline"


def textures(count: int, size: int, gen: torch.Generator) -> Tensor:
    """(count, size, size) smooth random images in about [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    img = torch.zeros(count, size, size)
    for _ in range(6):
        cx, cy = torch.rand(count, 1, 1, generator=gen) * size, torch.rand(count, 1, 1, generator=gen) * size
        sigma = 1.5 + torch.rand(count, 1, 1, generator=gen) * size / 5
        amp = torch.rand(count, 1, 1, generator=gen) * 2 - 1
        img += amp * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    for _ in range(2):
        f = 0.2 + torch.rand(count, 2, 1, 1, generator=gen) * 0.6
        ph = torch.rand(count, 1, 1, generator=gen) * 2 * math.pi
        img += 0.3 * torch.sin(f[:, 0] * xx + f[:, 1] * yy + ph)
    lo, hi = img.amin((1, 2), keepdim=True), img.amax((1, 2), keepdim=True)
    return (img - lo) / (hi - lo + 1e-6)


def make_pairs(cfg: BenchConfig, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """frames (count, 2, S, S), flow (count, S, S, 2) in pixels (u = x, v = y), frame2(p) = frame1(p - flow(p))."""
    gen = torch.Generator().manual_seed(seed)
    s, max_shift = cfg.data.length, float(cfg.data.options.get("max_shift", 2.0))
    frame1 = textures(count, s, gen)
    shift = (torch.rand(count, 2, generator=gen) * 2 - 1) * max_shift
    angle = (torch.rand(count, generator=gen) * 2 - 1) * 0.05
    zoom = 1 + (torch.rand(count, generator=gen) * 2 - 1) * 0.05
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    c = (s - 1) / 2
    x0, y0 = xx - c, yy - c
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    z = zoom[:, None, None]
    u = z * (cos * x0 - sin * y0) - x0 + shift[:, 0, None, None]
    v = z * (sin * x0 + cos * y0) - y0 + shift[:, 1, None, None]
    flow = torch.stack([u, v], dim=-1)  # (count, S, S, 2)
    src = torch.stack([xx - u, yy - v], dim=-1) / c - 1  # sample frame 1 at p - flow, normalised to [-1, 1]
    frame2 = F.grid_sample(frame1[:, None], src, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
    return torch.stack([frame1, frame2], dim=1), flow


def pixel_features(frames: Tensor, num_bands: int) -> Tensor:
    """(E, 2, S, S) -> (E, S*S, 18 + Fourier): the 3x3 patch of both frames at each pixel + its position."""
    e, _, s, _ = frames.shape
    patches = F.unfold(frames, kernel_size=3, padding=1)  # (E, 2*9, S*S)
    pos = FourierPositionEncoding((s, s), num_bands)(e)  # (E, S*S, F)
    return torch.cat([patches.transpose(1, 2) * 4.0, pos], dim=-1)


def end_point_error(pred: Tensor, true: Tensor) -> float:
    return float((pred - true).norm(dim=-1).mean())


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    mc, s = cfg.model, cfg.data.length
    train_f, train_flow = make_pairs(cfg, cfg.data.num_train, cfg.seed)
    test_f, test_flow = make_pairs(cfg, cfg.data.num_test, cfg.seed + 1)
    train_x, test_x = pixel_features(train_f, mc.num_bands), pixel_features(test_f, mc.num_bands)
    dim = train_x.shape[-1]
    train_t, test_t = train_flow.reshape(len(train_flow), s * s, 2), test_flow.reshape(len(test_flow), s * s, 2)
    decoder = make_decoder(mc, dim, 2)
    model = PerceiverIO(encoder_config(mc, dim), decoder, queries_from_inputs=True)
    num_q = int(cfg.data.options.get("train_queries", 128))
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(idx: Tensor) -> Tensor:
        q_idx = torch.randperm(s * s, generator=gen)[:num_q]
        pred = model(train_x[idx], query_index=q_idx)  # (B, num_q, 2)
        return (pred - train_t[idx][:, q_idx]).norm(dim=-1).mean()

    def predict() -> Tensor:
        return predict_in_batches(lambda i: model(test_x[i]), len(test_x), cfg.train.eval_batch_size)

    stats = train_model(
        model, loss_fn, len(train_x), cfg.train, gen, lambda: {"EPE": end_point_error(predict(), test_t)}
    )
    pred = predict()
    epe = end_point_error(pred, test_t)
    zero = end_point_error(torch.zeros_like(test_t), test_t)
    figures = []
    curve_fig = save_curve_plot(
        stats.curve, "EPE", f"B7 optical flow ({cfg.size})", ctx.figure_path(f"B7-flow-{cfg.size}-curve.png")
    )
    figures += [curve_fig] if curve_fig else []
    field_fig = _plot_fields(test_f, test_t, pred, s, ctx.figure_path(f"B7-flow-{cfg.size}-fields.png"))
    figures += [field_fig] if field_fig else []
    return TaskResult(
        metric_name="test EPE (px)",
        metric=epe,
        baseline_name="zero flow",
        baseline=zero,
        target=TARGET,
        target_met=epe <= 0.5 * zero,
        higher_is_better=False,
        **training_facts(model, stats, figures),
        extra={"epe_ratio_to_zero_flow": epe / zero, "image_side": s, "train_queries_per_example": num_q},
    )


def _plot_fields(frames: Tensor, true: Tensor, pred: Tensor, s: int, path) -> str | None:
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(3, len(frames))
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    step = max(1, s // 12)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    sl = (slice(None, None, step), slice(None, None, step))
    for r in range(rows):
        t, p = true[r].reshape(s, s, 2), pred[r].reshape(s, s, 2)
        axes[r, 0].imshow(frames[r, 0], cmap="gray")
        axes[r, 0].set_title("frame 1")
        for c, (field, name) in enumerate([(t, "true flow"), (p, f"predicted (EPE {end_point_error(p, t):.2f})")], 1):
            axes[r, c].imshow(frames[r, 1], cmap="gray", alpha=0.4)
            axes[r, c].quiver(xx[sl], yy[sl], field[..., 0][sl], -field[..., 1][sl], color="C3", angles="xy")
            axes[r, c].set_title(name)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


RUNNERS = {"flow": run}
