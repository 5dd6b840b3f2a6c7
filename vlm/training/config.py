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
    # N processes: ddp = full replicas + one gradient all-reduce per step; fsdp = torch FSDP2 shards the LM's
    # decoder layers, the connector and the gated blocks over the ranks, with sharded checkpoints (vlm.training.fsdp)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only the final one
    max_bad_steps: int = 5  # non-finite loss/gradient steps in a row (each skipped) before the run stops
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in the output directory, if any
    log_every: int = 10
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end

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
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.distributed == "fsdp" and self.precision == "fp16":
            raise ValueError(
                "train.distributed=fsdp trains in fp32 or bf16: fp16 needs a loss scaler whose overflow check "
                "spans every shard, which FSDP2 does not provide; set train.precision=bf16 (or fp32)"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"train.max_grad_norm must be positive or null, got {self.max_grad_norm}")


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # mean loss of every optimizer step run in this call
    resumed_from: int  # 0 when the run started fresh
    output_dir: Path
    metrics_csv: Path
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps skipped in this call for a non-finite loss or gradient
