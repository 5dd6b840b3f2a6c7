"""The ``train:`` section of a run (`TrainConfig`), what a call to `train` returns (`TrainResult`), and
`resolve_device`, which turns ``train.device`` into the device the run trains on."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

__all__ = ["TrainConfig", "TrainResult", "resolve_device"]


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
    # auto: the device a model placed off the CPU is on, else cuda:<local rank> when available, else cpu;
    # an explicit device (cpu, cuda, cuda:1, mps) must exist here, and the model is moved to it
    device: str = "auto"
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
        numbers = {"lr": self.lr, "lora_lr": self.lora_lr, "weight_decay": self.weight_decay, "eps": self.eps,
                   "min_lr_ratio": self.min_lr_ratio, "max_grad_norm": self.max_grad_norm,
                   "betas[0]": self.betas[0], "betas[1]": self.betas[1]}  # fmt: skip
        for name, value in numbers.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"train.{name} must be a finite number, got {value!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be in [0, 1), got {tuple(self.betas)}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"train.weight_decay must be >= 0 and train.eps > 0, got {self.weight_decay}, {self.eps}")
        _parse_device(self.device)
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
        for name in ("eval_every", "eval_batches", "eval_cider_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


def _parse_device(spec: str) -> torch.device | None:
    """``train.device`` as a torch.device (None for "auto"); a string torch cannot parse is a ValueError."""
    if spec == "auto":
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"train.device={spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise ValueError("train.device='meta' holds no data: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_device(spec: str, model_device: torch.device | None = None) -> torch.device:
    """The device a run trains on. "auto": ``model_device`` when the model was placed off the CPU (a
    ``device_map``), else ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU. An explicit
    device must be usable here: a tensor is allocated on it, so ``cuda:7`` on a one-GPU machine is a
    ValueError before any work starts, not a run that silently trains elsewhere."""
    device = _parse_device(spec)
    if device is None:
        if model_device is not None and model_device.type != "cpu":
            return model_device
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
        raise ValueError(f"train.device={spec!r} is not usable on this machine: {first}") from None
    return device


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
