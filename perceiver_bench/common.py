"""What every benchmark task shares: seeding, the training loop, metrics, results and records."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from resampler.config import to_dict

from .config import BenchConfig, TrainConfig

__all__ = [
    "TaskResult",
    "RunContext",
    "seed_everything",
    "count_parameters",
    "batches",
    "train_model",
    "accuracy",
    "mean_average_precision",
    "write_record",
    "update_results_table",
]


@dataclass
class RunContext:
    """Where a run may write figures (``None`` = no figures) and where earlier records may be read."""

    figures_dir: Path | None = None
    record_dirs: list[Path] = field(default_factory=list)

    def figure_path(self, name: str) -> Path | None:
        if self.figures_dir is None:
            return None
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        return self.figures_dir / name


@dataclass
class TaskResult:
    """One task's outcome. ``metric`` and ``baseline`` are in the same units (e.g. accuracy in [0, 1])."""

    metric_name: str
    metric: float
    baseline_name: str
    baseline: float
    target: str
    target_met: bool
    higher_is_better: bool = True
    parameters: int = 0
    train_seconds: float = 0.0
    throughput: float = 0.0  # training examples per second
    extra: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def margin_over_baseline(self) -> float:
        """How much better than the trivial baseline (positive = better), in the metric's units."""
        return self.metric - self.baseline if self.higher_is_better else self.baseline - self.metric


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def majority_baseline(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy on ``test_y`` of always predicting the most frequent training label."""
    return float((test_y == torch.bincount(train_y).argmax()).float().mean())


def training_facts(model: nn.Module, stats, figures: list[str | None] = ()) -> dict[str, Any]:
    """The `TaskResult` fields every trained task reports: size, time, throughput, curve, figures."""
    return {
        "parameters": count_parameters(model),
        "train_seconds": stats.seconds,
        "throughput": stats.throughput,
        "curve": stats.curve,
        "figures": [f for f in figures if f],
    }


def batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled index batches (a new permutation each epoch)."""
    if num_examples <= 0:
        raise ValueError(f"batches: need at least one example, got {num_examples}")
    while True:
        perm = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1 if num_examples >= batch_size else 1, batch_size):
            yield perm[start : start + batch_size]


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainStats:
    seconds: float
    examples: int
    curve: list[dict[str, float]]

    @property
    def throughput(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def train_model(
    model: nn.Module,
    loss_fn: Callable[[Tensor], Tensor],
    num_examples: int,
    cfg: TrainConfig,
    generator: torch.Generator,
    evaluate: Callable[[], dict[str, float]] | None = None,
    *,
    verbose: bool | None = None,
) -> TrainStats:
    """AdamW with warm-up + cosine; ``loss_fn(index_batch)`` returns the scalar loss of that batch.

    ``evaluate`` (optional) is called every ``cfg.eval_every`` steps and at the end; its numbers go
    into the training curve (evaluation time is not counted as training time). Curve points are
    printed when ``verbose`` (default: the ``PERCEIVER_BENCH_VERBOSE`` environment variable, set by the CLI).
    """
    if verbose is None:
        verbose = os.environ.get("PERCEIVER_BENCH_VERBOSE") == "1"
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    curve: list[dict[str, float]] = []
    seconds, examples, running = 0.0, 0, []
    index_batches = batches(num_examples, cfg.batch_size, generator)
    for step in range(cfg.steps):
        model.train()
        idx = next(index_batches)
        start = time.perf_counter()
        loss = loss_fn(idx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - start
        examples += len(idx)
        running.append(loss.item())
        last = step == cfg.steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            point = {"step": step + 1, "loss": float(np.mean(running)), "seconds": seconds}
            running = []
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    point.update(evaluate())
            curve.append(point)
            if verbose:
                print("   " + ", ".join(f"{k} {v:.4g}" for k, v in point.items()), flush=True)
    model.eval()
    return TrainStats(seconds=seconds, examples=examples, curve=curve)


def predict_in_batches(fn: Callable[[Tensor], Tensor], num_examples: int, batch_size: int) -> Tensor:
    """Concatenate ``fn(index_batch)`` over all examples in order, without gradients."""
    outs = []
    with torch.no_grad():
        for start in range(0, num_examples, batch_size):
            outs.append(fn(torch.arange(start, min(start + batch_size, num_examples))))
    return torch.cat(outs)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP over classes that have at least one positive (AudioSet's metric)."""
    from sklearn.metrics import average_precision_score

    keep = targets.sum(0) > 0
    return float(average_precision_score(targets[:, keep], scores[:, keep], average="macro"))


def library_version() -> str:
    from resampler import __version__

    return __version__


def write_record(result: TaskResult, cfg: BenchConfig, out_dir: Path) -> Path:
    """``<out_dir>/<task>-<size>.json`` with task, config, metric, baseline, parameters, timings, versions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "task": cfg.task,
        "size": cfg.size,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "metric_name": result.metric_name,
        "metric": result.metric,
        "baseline_name": result.baseline_name,
        "baseline": result.baseline,
        "target": result.target,
        "target_met": result.target_met,
        "parameters": result.parameters,
        "train_seconds": round(result.train_seconds, 3),
        "throughput_examples_per_s": round(result.throughput, 2),
        "extra": result.extra,
        "curve": result.curve,
        "figures": result.figures,
        "library_version": library_version(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    path = out_dir / f"{cfg.task}-{cfg.size}.json"
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


TABLE_BEGIN = "<!-- results-table:begin -->"
TABLE_END = "<!-- results-table:end -->"
TABLE_HEADER = [
    "| id | task | size | metric | value | trivial baseline | target | met | params | train s | ex/s | date |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def update_results_table(doc: Path, task_id: str, result: TaskResult, cfg: BenchConfig) -> None:
    """Replace (or add) the row of (task, size) in the table between the markers of ``doc``."""
    row = (
        f"| {task_id} | {cfg.task} | {cfg.size} | {result.metric_name} | {_fmt(result.metric)} | "
        f"{result.baseline_name} {_fmt(result.baseline)} | {result.target} | {'yes' if result.target_met else 'no'} | "
        f"{result.parameters:,} | {result.train_seconds:.1f} | {result.throughput:.1f} | "
        f"{time.strftime('%Y-%m-%d', time.gmtime())} |"
    )
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if TABLE_BEGIN not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"{TABLE_BEGIN}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_BEGIN, 1)
    body, tail = rest.split(TABLE_END, 1)
    rows = [line for line in body.strip().splitlines() if line.startswith("| B")]
    key = f"| {task_id} | {cfg.task} | {cfg.size} |"
    rows = [r for r in rows if not r.startswith(key)] + [row]
    rows.sort(key=lambda r: (int(r.split("|")[1].strip()[1:]), r.split("|")[3].strip() != "smoke"))
    table = "\n".join(TABLE_HEADER + rows)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}", encoding="utf-8")


def save_curve_plot(curve: list[dict[str, float]], metric_key: str, title: str, path: Path | None) -> str | None:
    """Loss and metric vs step, side by side; returns the file name or None."""
    if path is None or not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in curve]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [p["loss"] for p in curve], marker=".")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("train loss")
    axes[0].set_yscale("log")
    if metric_key in curve[0]:
        axes[1].plot(steps, [p[metric_key] for p in curve], marker=".", color="C1")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(metric_key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
