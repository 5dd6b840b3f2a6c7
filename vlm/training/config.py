"""The ``train:`` section of a run (`TrainConfig`) and what a call to `train` returns (`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["TrainConfig", "TrainResult"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run (``train:`` in a run YAML)."""

    max_steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 1e-3  # the connector: resampler, projection, gates, any other non-LoRA trainable weight
    lora_lr: float = 2e-4  # LoRA matrices (parameters of peft's lora_* modules)
    weight_decay: float = 0.0  # matrices only: never biases, norms, latents, embeddings or gates
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of each group's peak learning rate
    max_grad_norm: float | None = 1.0  # None: no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 on CPU: bf16 autocast there has no hardware behind it
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only the final one
    max_bad_steps: int = 5  # non-finite loss/gradient steps in a row (each skipped) before the run stops
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in the output directory, if any
    log_every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end
    wandb: bool = False  # also log to Weights & Biases (extra 'wandb'; WANDB_MODE=offline writes locally)
    wandb_project: str = "perceiver-vlm"
    eval_every: int = 0  # optimizer steps between validation passes (the run's val split); 0: none
    eval_batches: int = 0  # validation batches per pass; 0: the whole split
    eval_cider_samples: int = 0  # also caption this many validation images and log their CIDEr; 0: none
    stop_on_signal: bool = True  # SIGINT/SIGTERM: finish the step, checkpoint, stop (a second signal aborts)
    # resume although run_config.yaml differs in a field that changes the run (not only max_steps, logging,
    # checkpoint or eval cadence, progress); the differences are logged
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum_steps", "log_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr < 0 or self.lora_lr < 0:
            raise ValueError(f"train.lr and train.lora_lr must be >= 0, got {self.lr}, {self.lora_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"train.max_grad_norm must be positive or null, got {self.max_grad_norm}")
        for name in ("eval_every", "eval_batches", "eval_cider_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # mean loss of every optimizer step run in this call
    resumed_from: int  # 0 when the run started fresh
    output_dir: Path
    metrics_csv: Path
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps skipped in this call for a non-finite loss or gradient
    stopped_by: str | None = None  # the signal (SIGINT, SIGTERM) that stopped this call early, with a checkpoint
    stop_checkpoint: Path | None = None  # that checkpoint (None on ranks other than 0)
