"""B8: multimodal autoencoding (a Kinetics stand-in): video frames + audio + label through one latent array.

Each example: ``frames`` grayscale frames of ``length`` x ``length`` in which a bright square moves one
pixel per frame in one of 4 directions, a tone (low or high pitch) of ``audio_samples`` samples, and
the class label (direction x pitch = 8 classes) as a one-hot input. The library's
``MultimodalPreprocessor`` (video as 2x2 space-to-depth patches + 3D Fourier, audio as 16-sample
patches + 1D Fourier, the label one-hot) feeds a ``PerceiverEncoder``; a ``MultimodalDecoder`` with
Fourier queries for video and audio and a learned label query reconstructs all three.

The label input is masked out (its (B, 1) mask False) for half of the training examples and for
every test example, so the label must be inferred from video and audio, as in the paper's
evaluation. Metrics: label accuracy with the label masked, video PSNR (peak 1.0); baselines: the
majority class, and the PSNR of predicting the mean training frame.

Options: ``frames`` (4), ``audio_samples`` (256), ``video_patch`` (2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resampler.models.decoders import AudioPatchHead, ClassHead, FourierQueries, LearnedQueries
from resampler.models.multimodal import (
    MultimodalDecoder,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    PerceiverMultimodalAutoencoder,
)
from resampler.models.preprocessors import AudioPreprocessor, ImagePreprocessor
from resampler.nn.attention import AttentionSpec
from resampler.nn.blocks import FeedForwardSpec

from .common import RunContext, TaskResult, save_curve_plot, train_model, training_facts
from .config import BenchConfig
from .models import encoder_config

TARGET = "label accuracy (label masked) >= 90%; video PSNR reported"
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per frame
NUM_CLASSES = 8


def make_clips(cfg: BenchConfig, count: int, seed: int) -> dict[str, Tensor]:
    """video (E, T, 1, S, S), audio (E, A), labels (E,)."""
    gen = torch.Generator().manual_seed(seed)
    opts = cfg.data.options
    t_len, s, a_len = int(opts.get("frames", 4)), cfg.data.length, int(opts.get("audio_samples", 256))
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=gen)
    video = 0.05 * torch.rand(count, t_len, 1, s, s, generator=gen)
    margin = t_len + 1
    for i, label in enumerate(labels.tolist()):
        dy, dx = DIRECTIONS[label % 4]
        y0 = int(torch.randint(margin, s - margin - 2, (), generator=gen)) if s > 2 * margin + 2 else s // 2 - 1
        x0 = int(torch.randint(margin, s - margin - 2, (), generator=gen)) if s > 2 * margin + 2 else s // 2 - 1
        for t in range(t_len):
            y, x = y0 + dy * t, x0 + dx * t
            video[i, t, 0, max(0, y) : y + 3, max(0, x) : x + 3] = 1.0
    pitch = torch.where(labels >= 4, 1200.0, 300.0) * (1 + 0.1 * (torch.rand(count, generator=gen) * 2 - 1))
    phase = torch.rand(count, 1, generator=gen) * 2 * math.pi
    t = torch.arange(a_len) / 8000.0
    audio = torch.sin(2 * math.pi * pitch[:, None] * t + phase) + 0.1 * torch.randn(count, a_len, generator=gen)
    return {"video": video, "audio": audio, "labels": labels}


def build_model(cfg: BenchConfig) -> PerceiverMultimodalAutoencoder:
    opts, mc, s = cfg.data.options, cfg.model, cfg.data.length
    t_len, a_len, patch = (
        int(opts.get("frames", 4)),
        int(opts.get("audio_samples", 256)),
        int(opts.get("video_patch", 2)),
    )
    spp = 16
    pre = MultimodalPreprocessor(
        {
            "audio": AudioPreprocessor(spp, num_bands=mc.num_bands, num_samples=a_len // spp),
            "label": OneHotPreprocessor(NUM_CLASSES),
            "video": ImagePreprocessor(
                1,
                "patches",
                spatial_downsample=patch,
                video=True,
                num_bands=mc.num_bands,
                max_resolution=(t_len, s // patch, s // patch),
            ),
        }
    )
    out_dim = mc.latent_dim
    decoder = MultimodalDecoder(
        mc.latent_dim,
        {
            "audio": FourierQueries((a_len // spp,), mc.num_bands),
            "label": LearnedQueries(1, mc.latent_dim),
            "video": FourierQueries((t_len, s // patch, s // patch), mc.num_bands),
        },
        out_dim,
        heads={
            "audio": AudioPatchHead(out_dim, spp),
            "label": ClassHead(out_dim, NUM_CLASSES),
            "video": nn.Linear(out_dim, patch * patch),
        },
        attn=AttentionSpec(heads=1, qkv_bias=True),
        ff=FeedForwardSpec(mult=mc.widening),
    )
    return PerceiverMultimodalAutoencoder(pre, encoder_config(mc, pre.out_dim), decoder)


def video_from_patches(patches: Tensor, t_len: int, s: int, patch: int) -> Tensor:
    """(E, T*(S/p)^2, p*p) decoder output -> (E, T, 1, S, S) frames (inverse of 2D space-to-depth)."""
    e, g = patches.shape[0], s // patch
    x = patches.reshape(e, t_len, g, g, patch, patch)  # (E, T, gy, gx, py, px)
    return x.permute(0, 1, 2, 4, 3, 5).reshape(e, t_len, 1, s, s)


def psnr(pred: Tensor, true: Tensor) -> float:
    mse = float(((pred.clamp(0, 1) - true) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def run(cfg: BenchConfig, ctx: RunContext) -> TaskResult:
    opts, s = cfg.data.options, cfg.data.length
    t_len, patch = int(opts.get("frames", 4)), int(opts.get("video_patch", 2))
    train = make_clips(cfg, cfg.data.num_train, cfg.seed)
    test = make_clips(cfg, cfg.data.num_test, cfg.seed + 1)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    def forward(part: dict[str, Tensor], idx: Tensor, label_visible: Tensor) -> dict[str, Tensor]:
        inputs = {
            "audio": part["audio"][idx],
            "label": F.one_hot(part["labels"][idx], NUM_CLASSES).float(),
            "video": part["video"][idx],
        }
        out = model(inputs, masks={"label": label_visible[:, None]})
        out["video"] = video_from_patches(out["video"], t_len, s, patch)
        return out

    def loss_fn(idx: Tensor) -> Tensor:
        visible = torch.rand(len(idx), generator=gen) < 0.5
        out = forward(train, idx, visible)
        return (
            F.mse_loss(out["video"], train["video"][idx]) * 10
            + F.mse_loss(out["audio"], train["audio"][idx])
            + F.cross_entropy(out["label"], train["labels"][idx])
        )

    def predict() -> dict[str, Tensor]:
        outs = []
        with torch.no_grad():
            for start in range(0, cfg.data.num_test, cfg.train.eval_batch_size):
                idx = torch.arange(start, min(start + cfg.train.eval_batch_size, cfg.data.num_test))
                outs.append(forward(test, idx, torch.zeros(len(idx), dtype=torch.bool)))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def evaluate() -> dict[str, float]:
        out = predict()
        return {
            "label_accuracy": float((out["label"].argmax(-1) == test["labels"]).float().mean()),
            "video_psnr": psnr(out["video"], test["video"]),
        }

    stats = train_model(model, loss_fn, cfg.data.num_train, cfg.train, gen, evaluate)
    out = predict()
    label_acc = float((out["label"].argmax(-1) == test["labels"]).float().mean())
    video_psnr = psnr(out["video"], test["video"])
    mean_frame_psnr = psnr(train["video"].mean(0, keepdim=True).expand_as(test["video"]), test["video"])
    audio_mse = float(F.mse_loss(out["audio"], test["audio"]))
    figures = []
    curve = save_curve_plot(
        stats.curve,
        "label_accuracy",
        f"B8 multimodal ({cfg.size})",
        ctx.figure_path(f"B8-multimodal-{cfg.size}-curve.png"),
    )
    figures += [curve] if curve else []
    recon = _plot_reconstructions(test, out, ctx.figure_path(f"B8-multimodal-{cfg.size}-reconstructions.png"))
    figures += [recon] if recon else []
    return TaskResult(
        metric_name="label accuracy (label masked)",
        metric=label_acc,
        baseline_name="majority",
        baseline=float((test["labels"] == torch.bincount(train["labels"]).argmax()).float().mean()),
        target=TARGET,
        target_met=label_acc >= 0.90,
        **training_facts(model, stats, figures),
        extra={
            "video_psnr_db": video_psnr,
            "video_psnr_mean_frame_baseline_db": mean_frame_psnr,
            "audio_mse": audio_mse,
            "audio_variance": float(test["audio"].var()),
        },
    )


def _plot_reconstructions(test: dict[str, Tensor], out: dict[str, Tensor], path) -> str | None:
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, t_len = min(3, len(test["labels"])), test["video"].shape[1]
    fig, axes = plt.subplots(2 * rows, t_len + 1, figsize=(2 * (t_len + 1), 2 * 2 * rows), squeeze=False)
    for r in range(rows):
        for t in range(t_len):
            axes[2 * r, t].imshow(test["video"][r, t, 0], cmap="gray", vmin=0, vmax=1)
            axes[2 * r + 1, t].imshow(out["video"][r, t, 0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            axes[2 * r, t].set_title(f"true t={t}", fontsize=8)
            axes[2 * r + 1, t].set_title(f"recon t={t}", fontsize=8)
        axes[2 * r, t_len].plot(test["audio"][r, :128])
        axes[2 * r, t_len].set_title(f"audio, label {int(test['labels'][r])}", fontsize=8)
        axes[2 * r + 1, t_len].plot(out["audio"][r, :128], color="C1")
        axes[2 * r + 1, t_len].set_title(f"recon, pred {int(out['label'][r].argmax())}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name


RUNNERS = {"multimodal": run}
