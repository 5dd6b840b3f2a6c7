"""One training loop for one process or many (torch.distributed, gloo on CPU / nccl on GPU).

``train(model, loader, config, output_dir)`` runs AdamW (separate learning rates for the connector
— resampler, projection, gates — and for LoRA) with warmup + cosine, gradient accumulation,
clipping, an fp32/bf16/fp16 autocast choice, atomic checkpoints every N steps (trainable weights,
optimizer, scheduler, grad scaler, every rank's RNG state and the data position) and a resume that
continues the same run bit for bit. Metrics go to ``metrics.csv`` and TensorBoard, and a loss-curve
PNG is drawn at the end.

The model is anything whose ``model(**batch)`` returns an object with ``.loss``; its trainable
parameters are those with ``requires_grad``. Launch N processes with
``torchrun --standalone --nproc_per_node N ...``: every rank sees its own slice of each global batch
and gradients are averaged with one all-reduce per optimizer step (after accumulation).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EpochLoader",
    "train",
    "build_optimizer",
    "warmup_cosine",
    "init_distributed",
    "latest_checkpoint",
    "set_seed",
]

CHECKPOINT_DIR = "checkpoints"
METRIC_FIELDS = ["step", "loss", "lr_connector", "lr_lora", "grad_norm", "samples_per_s", "elapsed_s"]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run (``train:`` in a run YAML)."""

    max_steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 1e-3  # resampler + projection (+ gates and any other non-LoRA trainable weight)
    lora_lr: float = 2e-4  # LoRA matrices (parameter names containing "lora_")
    weight_decay: float = 0.0  # applied to matrices only, never to norms, biases or embeddings rows
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of each group's peak learning rate
    max_grad_norm: float | None = 1.0  # None: no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32 on CPU: this CPU has no bf16 hardware
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


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # mean loss of every optimizer step run in this call
    resumed_from: int  # 0 when the run started fresh
    output_dir: Path
    metrics_csv: Path
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps skipped in this call for a non-finite loss or gradient


# ----------------------------------------------------------------------------------------------
# The loop


def train(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    seed: int = 0,
    run_config: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on batches from ``loader``; see the module docstring.

    Args:
        model: ``model(**batch).loss`` is minimised; parameters with ``requires_grad`` are trained.
        loader: an iterable of batches (dicts). An `EpochLoader` (or anything with ``state_dict``/
            ``load_state_dict``/``set_epoch``) resumes exactly; any other iterable is fast-forwarded
            by the number of batches already consumed.
        output_dir: checkpoints, metrics.csv, TensorBoard events and loss_curve.png go here.
        seed: seeds python, numpy and torch (offset by rank) before the first step of a fresh run.
        run_config: the full run configuration, stored in every checkpoint for the record.
        stop_after: stop (with a checkpoint) after this many optimizer steps of this call — for
            tests and for time-boxed jobs; the run can then be resumed.
    """
    out = Path(output_dir)
    rank, world = _rank(), _world()
    device = _model_device(model)
    set_seed(seed + rank)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("train: the model has no parameter with requires_grad=True; nothing to train")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    _broadcast_parameters(trainable.values())
    optimizer = build_optimizer(trainable, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    stream = _BatchStream(loader)

    start_step = 0
    ckpt = latest_checkpoint(out) if config.resume else None
    if ckpt is not None:
        start_step = _load_checkpoint(ckpt, trainable, optimizer, scheduler, scaler, stream)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logger = _MetricLogger(out, start_step, config, enabled=rank == 0)
    end_step = config.max_steps if stop_after is None else min(config.max_steps, start_step + stop_after)
    progress = _progress(start_step, config, enabled=rank == 0 and config.progress)

    model.train()
    losses: list[float] = []
    step = start_step
    skipped, bad_in_row = 0, 0
    tick = time.perf_counter()
    while step < end_step:
        step_loss, samples, bad = 0.0, 0, False
        for _ in range(config.grad_accum_steps):
            batch = _to_device(next(stream), device)
            with _autocast(device, config.precision):
                loss = model(**batch).loss
            if bad or not torch.isfinite(loss):  # keep consuming the step's micro-batches, skip their backward
                bad = True
                continue
            scaler.scale(loss / config.grad_accum_steps).backward()
            step_loss += loss.item() / config.grad_accum_steps
            samples += _batch_size(batch)
        skip, grad_norm = _any_rank(bad, world), math.nan
        if not skip:
            _average_gradients(trainable.values(), world)
            scaler.unscale_(optimizer)
            grad_norm = _clip(trainable.values(), config.max_grad_norm)
            skip = not math.isfinite(grad_norm) and not scaler.is_enabled()  # fp16: the scaler skips, rescales
        if skip:
            optimizer.zero_grad(set_to_none=True)
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            _warn(f"train: skipped step {step + 1}: non-finite loss or gradient ({bad_in_row} in a row)")
            if bad_in_row >= config.max_bad_steps:
                path = save_checkpoint(out, step, trainable, optimizer, scheduler, scaler, stream, config, run_config)
                raise FloatingPointError(
                    f"train: {bad_in_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(train.max_bad_steps={config.max_bad_steps}); stopped after step {step}. The last good state "
                    f"is saved in {path or out / CHECKPOINT_DIR}. Lower train.lr, check the data, or use fp32."
                )
            continue
        bad_in_row = 0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        step_loss = _mean_over_ranks(step_loss, world)
        losses.append(step_loss)
        now = time.perf_counter()
        logger.log(step, step_loss, scheduler.get_last_lr(), optimizer, grad_norm, samples * world / (now - tick))
        tick = now
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        if step == end_step or (config.checkpoint_every and step % config.checkpoint_every == 0):
            save_checkpoint(out, step, trainable, optimizer, scheduler, scaler, stream, config, run_config)
    if progress is not None:
        progress.close()
    logger.close(plot=config.plot and step == config.max_steps)
    return TrainResult(step, losses, start_step, out, out / "metrics.csv", logger.rows, skipped)


def _any_rank(flag: bool, world: int) -> bool:
    """True on every rank when ``flag`` is True on any: all ranks skip a step together."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _clip(params: Iterable[Tensor], max_norm: float | None) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm is None:
        norms = [p.grad.detach().norm() for p in params]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing in the model's transformers LM (``model.language_model``) or the model itself."""
    target = getattr(model, "language_model", model)
    enable = getattr(target, "gradient_checkpointing_enable", None)
    if not callable(enable):
        raise ValueError(
            "train.gradient_checkpointing=true but the model has no gradient_checkpointing_enable(); "
            "set train.gradient_checkpointing=false"
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(target, "enable_input_require_grads"):  # checkpointed blocks need an input that requires grad
        target.enable_input_require_grads()


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(trainable: dict[str, nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with four groups: {connector, lora} x {decayed matrices, undecayed vectors/rows}.

    LoRA matrices are recognised by "lora_" in the parameter name (peft's naming); everything else
    trainable (resampler, projection, gates, new token rows) is the connector.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in trainable.items():
        part = "lora" if "lora_" in name else "connector"
        decay = p.dim() >= 2 and "embed" not in name and "latents" not in name
        groups.setdefault((part, decay), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": config.lora_lr if part == "lora" else config.lr,
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=config.betas, eps=config.eps)


def warmup_cosine(config: TrainConfig):
    """LambdaLR factor: linear warmup from 0 to 1, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------------------------
# Data position


class EpochLoader:
    """Batches from an indexable dataset, reshuffled per epoch from ``seed``, with an exact position.

    Global batch g of an epoch is ``perm[g*B*W : (g+1)*B*W]`` and rank r takes its r-th slice of B,
    so W processes with batch B see the same samples as one process with batch W*B. The last
    incomplete global batch of an epoch is dropped. ``state_dict()`` is (epoch, batch index).
    """

    def __init__(self, dataset, batch_size: int, collate, *, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"EpochLoader: batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world = _rank(), _world()
        self.batches_per_epoch = len(dataset) // (batch_size * self.world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"EpochLoader: {len(dataset)} samples are fewer than one global batch "
                f"(batch_size {batch_size} x {self.world} processes)"
            )
        self.epoch, self.index = 0, 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            order = self._order(self.epoch)
            while self.index < self.batches_per_epoch:
                start = (self.index * self.world + self.rank) * self.batch_size
                self.index += 1
                yield self.collate([self.dataset[int(i)] for i in order[start : start + self.batch_size]])
            self.epoch, self.index = self.epoch + 1, 0

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class _BatchStream:
    """Endless batches with a resumable position (exact for EpochLoader-like loaders, else by skipping).

    A streaming loader (e.g. `vlm.data.CaptionLoader`) must give the same batches for the same epoch
    (set by ``set_epoch``); it is then resumed by replaying the epoch up to the saved batch.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.exact = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        self.epoch = 0
        self.in_epoch = 0  # batches handed out on this rank in the current epoch
        self._it: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._it is None:
            if not self.exact and hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self._it = iter(self.loader)
        while True:
            try:
                batch = next(self._it)
                break
            except StopIteration:
                if self.in_epoch == 0:
                    raise ValueError("train: the data loader gave no batch in a whole epoch") from None
                self.epoch, self.in_epoch = self.epoch + 1, 0
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
        self.in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "in_epoch": self.in_epoch}
        if self.exact:
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._it = int(state["epoch"]), None
        if self.exact:
            self.in_epoch = int(state["in_epoch"])
            self.loader.load_state_dict(state["loader"])
            return
        self.in_epoch = 0
        for _ in range(int(state["in_epoch"])):  # replay the epoch up to where the run stopped
            next(self)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        path = root / name
        # only a step_* directory right under checkpoints/: a crafted pointer cannot lead elsewhere
        if name.startswith("step_") and Path(name).name == name and (path / "state.json").is_file():
            return path
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    stream: _BatchStream,
    config: TrainConfig,
    run_config: dict[str, Any] | None,
) -> Path | None:
    """Write ``checkpoints/step_XXXXXXX`` atomically: a temp dir, then os.replace, then ``latest``.

    Every rank's RNG and data position are gathered to rank 0, which writes; replicas hold the same
    weights and optimizer state, so rank 0's copy stands for all.
    """
    rank_states = _gather({"rng": _rng_state(), "data": stream.state_dict()})
    if _rank() != 0:
        _barrier()
        return None
    root = output_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
        tmp / "optimizer.pt",
    )
    torch.save([s["rng"] for s in rank_states], tmp / "rng.pt")
    state = {
        "step": step,
        "world_size": _world(),
        "data": [s["data"] for s in rank_states],
        "trainable": sorted(trainable),
        "train_config": _plain(config),
        "run_config": run_config,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks the dir complete
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p != final)[: -config.keep_checkpoints + 1 or None]:
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _load_checkpoint(path: Path, trainable, optimizer, scheduler, scaler, stream: _BatchStream) -> int:
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != _world():
        raise ValueError(
            f"resume: checkpoint {path} was written by {state['world_size']} processes, this run has {_world()}; "
            "resume with the same number of processes or start a new output_dir"
        )
    if state["trainable"] != sorted(trainable):
        missing = set(state["trainable"]) ^ set(trainable)
        raise ValueError(f"resume: trainable parameters differ from checkpoint {path}: {sorted(missing)[:5]}...")
    # Read and check every file before changing anything: a damaged checkpoint loads nothing.
    weights = _read_checkpoint_file(path / "trainable.safetensors", lambda f: load_file(str(f)))
    for name, p in trainable.items():
        if name not in weights:
            raise ValueError(f"resume: {path}/trainable.safetensors lacks {name!r}; the checkpoint is damaged")
        if weights[name].shape != p.shape:
            raise ValueError(
                f"resume: {path}/trainable.safetensors holds {name!r} with shape {tuple(weights[name].shape)}, "
                f"the model has {tuple(p.shape)}"
            )
    opt = _read_checkpoint_file(path / "optimizer.pt", _safe_torch_load)
    rng = _read_checkpoint_file(path / "rng.pt", _safe_torch_load)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    scaler.load_state_dict(opt["scaler"])
    stream.load_state_dict(state["data"][_rank()])
    _set_rng_state(rng[_rank()])
    return int(state["step"])


def _safe_torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_checkpoint_file(path: Path, read) -> Any:
    """``read(path)``; a cut or corrupt file becomes a ValueError naming it (a pickle that would run
    code still fails loudly as ``pickle.UnpicklingError``, from ``weights_only=True``)."""
    from safetensors import SafetensorError

    try:
        return read(path)
    except (SafetensorError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"resume: {path} is truncated or corrupt ({str(err).splitlines()[0][:200]}); nothing was loaded. "
            f"Delete {path.parent} to resume from the checkpoint before it."
        ) from None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and tuples only, so it loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Distributed


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); (rank, world); (0, 1) alone.

    ``timeout_s`` (default: env ``PVLM_DIST_TIMEOUT`` or torch's default) bounds every collective: when
    another process dies or hangs, this one raises instead of waiting forever.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout_s = timeout_s if timeout_s is not None else float(os.environ.get("PVLM_DIST_TIMEOUT", "0")) or None
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"init_distributed: timeout_s must be positive, got {timeout_s}")
        dist.init_process_group(backend, timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _rank(), _world()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    objs: list[Any] = [None] * _world()
    dist.all_gather_object(objs, obj)
    return objs


def _broadcast_parameters(params: Iterable[Tensor]) -> None:
    """Start every replica from rank 0's trainable weights."""
    if dist.is_initialized():
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def _average_gradients(params: Iterable[Tensor], world: int) -> None:
    """One flat all-reduce of every trainable gradient per optimizer step, then divide by the world."""
    if world == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:  # a parameter unused on this rank still joins the reduction with zeros
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (sum of numel,)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / world)


# ----------------------------------------------------------------------------------------------
# Logging


class _MetricLogger:
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
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(_fmt(r) for r in self.rows)
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


def _progress(start: int, config: TrainConfig, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    interval = 0.5 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not every step
    return tqdm(total=config.max_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=interval)


def _fmt(row: dict[str, float]) -> dict[str, Any]:
    return {k: (int(v) if k == "step" else f"{v:.6g}") for k, v in row.items()}


# ----------------------------------------------------------------------------------------------
# Small helpers


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _plain(config: Any) -> Any:
    from resampler.config import to_dict

    return to_dict(config)
