"""What a training run reports: ``metrics.csv``, ``eval_metrics.csv``, TensorBoard scalars, optional
Weights & Biases, a console line every ``train.log_every`` steps, a tqdm bar and ``loss_curve.png``.

Only rank 0 writes. A resumed run first cuts both CSV files back to the resumed step (and TensorBoard
purges the later events), so the files always hold one clean history. The console line gives the step,
its loss, both learning rates, samples/s over the last ``log_every`` steps and the ETA from this call's
pace; it is written through tqdm so a bar on the same terminal stays intact. Weights & Biases
(``train.wandb``) resumes the same W&B run: its id is kept in ``<output_dir>/wandb_run_id``.
"""

from __future__ import annotations

import csv
import io
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write
from .config import TrainConfig

__all__ = ["METRIC_FIELDS", "MetricLogger", "plot_loss_curve", "progress_bar"]

METRIC_FIELDS = ["step", "loss", "lr_connector", "lr_lora", "grad_norm", "samples_per_s", "elapsed_s"]
EVAL_FILE = "eval_metrics.csv"


class MetricLogger:
    """metrics.csv (truncated to the resumed step, so a resumed run has one clean history) + TensorBoard."""

    def __init__(self, out: Path, start_step: int, config: TrainConfig, enabled: bool) -> None:
        self.enabled, self.config, self.out = enabled, config, out
        self.rows: list[dict[str, float]] = []
        self.eval_rows: list[dict[str, float]] = []
        self.path = out / "metrics.csv"
        self.tb = None
        self.wandb = None
        self.start = time.perf_counter()
        self.first_step, self.call_start = start_step, self.start
        self.last_line_step = start_step  # the step of the previous console line
        if not enabled:
            return
        self.rows = _keep_until(self.path, start_step, METRIC_FIELDS)
        self.eval_rows = _keep_until(out / EVAL_FILE, start_step, None)
        if self.rows:
            self.start -= self.rows[-1]["elapsed_s"]
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if config.wandb:
            self.wandb = _start_wandb(out, config)

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
        due = step % self.config.log_every == 0 or step == self.config.max_steps
        if self.tb is not None and (due or step == 1):
            for key in ("loss", "lr_connector", "lr_lora", "grad_norm", "samples_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], step)
        if self.wandb is not None and (due or step == 1):
            keys = ("loss", "lr_connector", "lr_lora", "grad_norm", "samples_per_s")
            self.wandb.log({f"train/{k}": row[k] for k in keys}, step=step)
        if due:
            self._console(row)

    def _console(self, row: dict[str, float]) -> None:
        step, now = int(row["step"]), time.perf_counter()
        rate = self._mean_rate(self.last_line_step)
        done = step - self.first_step
        eta = (now - self.call_start) / done * (self.config.max_steps - step) if done else math.nan
        self.last_line_step = step
        _write(
            f"step {step}/{self.config.max_steps}  loss {row['loss']:.4f}  "
            f"lr {row['lr_connector']:.3g}/{row['lr_lora']:.3g}  {rate:.1f} samples/s  ETA {_duration(eta)}"
        )

    def _mean_rate(self, since_step: int) -> float:
        """Samples per second over the steps after ``since_step`` (each step's rate weighted by its time)."""
        rows = [r for r in self.rows if r["step"] > since_step]
        seconds = sum(1.0 / r["samples_per_s"] for r in rows if r["samples_per_s"] > 0)
        return len(rows) / seconds if seconds else 0.0

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics of ``step``: ``eval_metrics.csv``, TensorBoard/W&B ``val/*`` and a console line."""
        if not self.enabled or not metrics:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.eval_rows.append(row)
        fields = list(dict.fromkeys(k for r in self.eval_rows for k in r))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fields, restval="")
        writer.writeheader()
        writer.writerows(_fmt(r) for r in self.eval_rows)
        atomic_write(self.out / EVAL_FILE, text.getvalue())
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"val/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        _write(f"step {step}/{self.config.max_steps}  " + "  ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))

    def close(self, plot: bool) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
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


def _keep_until(path: Path, start_step: int, fields: list[str] | None) -> list[dict[str, float]]:
    """The rows of ``path`` up to ``start_step`` (none for a fresh run); the file is rewritten with them."""
    rows: list[dict[str, float]] = []
    if start_step > 0 and path.is_file():
        with open(path, newline="") as fh:
            rows = [
                {k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)
                if float(row["step"]) <= start_step
            ]
    if fields is None and not rows:
        path.unlink(missing_ok=True)
        return rows
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fields or list(dict.fromkeys(k for r in rows for k in r)), restval="")
    writer.writeheader()
    writer.writerows(_fmt(r) for r in rows)
    atomic_write(path, text.getvalue())
    return rows


def _write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _start_wandb(out: Path, config: TrainConfig):
    """A W&B run for this output directory, resumed by the id kept in ``wandb_run_id``."""
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb=true needs the wandb package: pip install 'perceiver-vlm[wandb]'") from None
    from resampler.config import to_dict

    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    atomic_write(id_file, run_id)
    return wandb.init(
        project=config.wandb_project, id=run_id, resume="allow", dir=str(out), config=to_dict(config), name=out.name
    )
