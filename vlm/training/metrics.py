"""What a training run reports: ``metrics.csv``, TensorBoard scalars, a tqdm bar and ``loss_curve.png``.

Only rank 0 writes. A resumed run first cuts ``metrics.csv`` back to the resumed step (and TensorBoard
purges the later events), so the files always hold one clean history.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write
from .config import TrainConfig

__all__ = ["METRIC_FIELDS", "MetricLogger", "plot_loss_curve", "progress_bar"]

METRIC_FIELDS = ["step", "loss", "lr_connector", "lr_lora", "grad_norm", "samples_per_s", "elapsed_s"]


class MetricLogger:
    """metrics.csv (truncated to the resumed step, so a resumed run has one clean history) + TensorBoard."""

    def __init__(self, out: Path, start_step: int, config: TrainConfig, enabled: bool) -> None:
        self.enabled, self.config, self.out = enabled, config, out
        self.rows: list[dict[str, float]] = []
        self.path = out / "metrics.csv"
        self.tb = None
        self.start = time.perf_counter()
        if not enabled:
            return
        if start_step > 0 and self.path.is_file():
            with open(self.path, newline="") as fh:
                self.rows = [
                    {k: float(v) for k, v in row.items()}
                    for row in csv.DictReader(fh)
                    if float(row["step"]) <= start_step
                ]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(_fmt(r) for r in self.rows)
        atomic_write(self.path, text.getvalue())
        if self.rows:
            self.start -= self.rows[-1]["elapsed_s"]
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, loss: float, lrs: list[float], optimizer, grad_norm: float, samples_per_s: float):
        if not self.enabled:
            return
        by_name = {g["name"]: lr for g, lr in zip(optimizer.param_groups, lrs)}
        row = {
            "step": step,
            "loss": loss,
            "lr_connector": by_name.get("connector", by_name.get("connector_no_decay", 0.0)),
            "lr_lora": by_name.get("lora", by_name.get("lora_no_decay", 0.0)),
            "grad_norm": grad_norm,
            "samples_per_s": samples_per_s,
            "elapsed_s": time.perf_counter() - self.start,
        }
        self.rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, METRIC_FIELDS).writerow(_fmt(row))
        if self.tb is not None and (step % self.config.log_every == 0 or step == 1):
            for key in ("loss", "lr_connector", "lr_lora", "grad_norm", "samples_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], step)

    def close(self, plot: bool) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        if plot and self.rows:
            plot_loss_curve(self.rows, self.out / "loss_curve.png")


def plot_loss_curve(rows: list[dict[str, float]], path: Path) -> None:
    """Loss per step (log scale) and its running mean over a twentieth of the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss per step")
    window = max(1, len(loss) // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def progress_bar(start: int, total: int, enabled: bool):
    """A tqdm bar from ``start`` to ``total`` optimizer steps, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    interval = 0.5 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not every step
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=interval)


def _fmt(row: dict[str, float]) -> dict[str, Any]:
    return {k: (int(v) if k == "step" else f"{v:.6g}") for k, v in row.items()}
