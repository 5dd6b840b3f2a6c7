"""Typed configs of the standalone Perceiver benchmarks; ``perceiver_bench/configs/<task>.yaml`` mirrors them.

Each YAML holds a ``TaskConfigs``: one ``BenchConfig`` for the ``smoke`` size (seconds, run by the
tests) and one for the ``full`` size (minutes, run by ``perceiver-bench run <task> --size full``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from resampler.config import apply_overrides, from_dict, load_yaml, to_dict

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "BenchConfig", "TaskConfigs", "load_task_config", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped with the package


@dataclass
class DataConfig:
    """What the fixed-seed generator (or loader) produces.

    ``length`` is the task's input size: image side in pixels (digits, flow), points per cloud,
    audio samples, bytes per sequence, entities per set (maximum), or the copy length (B11).
    ``options`` holds the few task-specific knobs documented in each task module.
    """

    num_train: int = 1000
    num_test: int = 300
    length: int = 0
    num_classes: int = 10
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Perceiver shape: N latents of width D; ``num_cross_attends`` x [cross-attend, L self-attends]."""

    num_latents: int = 32
    latent_dim: int = 64
    num_cross_attends: int = 1
    num_self_attends: int = 2
    self_heads: int = 4
    cross_heads: int = 1
    num_bands: int = 8
    widening: float = 2.0
    dropout: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batch_size: int = 256


@dataclass
class BenchConfig:
    task: str = "digits"
    size: Literal["smoke", "full"] = "smoke"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.steps < 0 or self.train.batch_size <= 0:
            raise ValueError(
                f"BenchConfig: train.steps must be >= 0 and train.batch_size > 0, got "
                f"{self.train.steps} and {self.train.batch_size}"
            )
        if self.data.num_train <= 0 or self.data.num_test <= 0:
            raise ValueError(
                f"BenchConfig: data.num_train and data.num_test must be positive, got "
                f"{self.data.num_train} and {self.data.num_test}"
            )


@dataclass
class TaskConfigs:
    """The YAML file of one task: its smoke and full sizes."""

    smoke: BenchConfig = field(default_factory=BenchConfig)
    full: BenchConfig = field(default_factory=BenchConfig)


def load_task_config(
    task: str, size: str = "smoke", overrides: list[str] | None = None, config_dir: Path | None = None
) -> BenchConfig:
    """``<config_dir>/<task>.yaml``'s ``size`` section plus ``section.field=value`` overrides."""
    if size not in ("smoke", "full"):
        raise ValueError(f"size must be 'smoke' or 'full', got {size!r}")
    path = (config_dir or CONFIG_DIR) / f"{task}.yaml"
    if not path.is_file():
        raise ValueError(f"no config for task {task!r}: expected {path}")
    data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    configs = from_dict(TaskConfigs, data, where=path.name)
    chosen = to_dict(getattr(configs, size))
    return from_dict(BenchConfig, apply_overrides(chosen, list(overrides or [])))
