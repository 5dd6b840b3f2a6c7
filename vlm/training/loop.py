"""One training loop for one process or many (torch.distributed, gloo on CPU / nccl on GPU).

``train(model, loader, config, output_dir)`` runs AdamW over `vlm.training.optim.param_groups`
(separate learning rates for the connector and for LoRA) with the warmup-cosine schedule, gradient
accumulation, clipping, an fp32/bf16/fp16 autocast choice, atomic checkpoints every N steps
(`vlm.training.state`) and a resume from the newest verified checkpoint that continues the same run
bit for bit. A step is skipped and counted when its loss or gradient is non-finite, or when the
update itself left a parameter non-finite (`vlm.training.guard` rolls it back); ``train.max_bad_steps``
of them in a row stop the run with a checkpoint of the last good (finite) state, which prunes nothing.
Metrics go to ``metrics.csv``, TensorBoard (and Weights & Biases when asked) with a console line every
``train.log_every`` steps, and a loss-curve PNG is drawn at the end (`vlm.training.metrics`). A
``validate(step)`` callback runs every ``train.eval_every`` steps, its RNG use kept out of the run.
SIGINT/SIGTERM stop the run after the current step with a checkpoint that prunes nothing
(`vlm.training.interrupt`). ``train.distributed=fsdp`` shards the model (`vlm.training.fsdp`) and
writes sharded checkpoints (`vlm.training.sharded`).

The model is anything whose ``model(**batch)`` returns an object with ``.loss``; its trainable
parameters are those with ``requires_grad``. Launch N processes with
``torchrun --standalone --nproc_per_node N ...``: every rank sees its own slice of each global batch
and gradients are averaged with one all-reduce per optimizer step (after accumulation). With
``train.distributed=fsdp`` the model is sharded instead (`vlm.training.fsdp`: FSDP2 reduce-scatters the
gradients in backward) and checkpoints are sharded (`vlm.training.sharded`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import any_rank, average_gradients, broadcast_parameters, mean_over_ranks, print0, rank, world_size
from . import sharded
from .batches import BatchStream
from .config import TrainConfig, TrainResult, resolve_device
from .fsdp import shard_model
from .guard import StepGuard
from .interrupt import StopOnSignal
from .metrics import MetricLogger, progress_bar
from .optim import build_optimizer, warmup_cosine
from .state import CHECKPOINT_DIR, find_checkpoint, load_checkpoint, save_checkpoint, set_seed
from .validation import preserved_rng

__all__ = ["train", "enable_gradient_checkpointing"]


def train(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    seed: int = 0,
    run_config: dict[str, Any] | None = None,
    stop_after: int | None = None,
    validate: Callable[[int], dict[str, float]] | None = None,
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
        validate: called with the step every ``config.eval_every`` steps (on every rank); the metrics
            it returns are logged (``eval_metrics.csv``, TensorBoard ``val/*``). The RNG state is
            restored after it, so validating never changes the training run.

    SIGINT/SIGTERM during the call: the step in progress completes, a checkpoint is written and the
    call returns with ``stopped_by`` set to the signal's name; a second signal raises
    `vlm.training.interrupt.TrainingAborted`.
    """
    with StopOnSignal(enabled=config.stop_on_signal) as stop, BatchStream(loader) as stream:
        return _train(model, stream, config, output_dir, seed, run_config, stop_after, validate, stop)


def _train(model, stream, config, output_dir, seed, run_config, stop_after, validate, stop) -> TrainResult:
    out = Path(output_dir)
    main, world = rank() == 0, world_size()
    device = resolve_device(config.device, _model_device(model))
    set_seed(seed + rank())
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("train: the model has no parameter with requires_grad=True; nothing to train")
    if any(p.device != device for p in trainable.values()):
        model.to(device)  # train.device is honoured: the model trains where the config says
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    fsdp = config.distributed == "fsdp"
    if not fsdp:
        broadcast_parameters(trainable.values())
    else:  # broadcast, then shard (unless sharded already); parameters become DTensors: rebuild what refers to them
        model = shard_model(model, config)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        device = _model_device(model)
    save, load = (sharded.save_checkpoint, sharded.load_checkpoint) if fsdp else (save_checkpoint, load_checkpoint)
    weights = model if fsdp else trainable  # what the checkpoint functions read and restore
    optimizer = build_optimizer(model, config)
    schedule = warmup_cosine(config.max_steps, config.warmup_steps, config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    start_step = 0
    ckpt = (sharded.find_checkpoint if fsdp else find_checkpoint)(out) if config.resume else None
    if ckpt is not None:
        start_step = load(ckpt, weights, optimizer, scheduler, scaler, stream)
        print0(
            f"train: resuming from step {start_step} of {config.max_steps} (checkpoint {getattr(ckpt, 'path', ckpt)})"
        )
    guard = StepGuard(trainable.values(), optimizer)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(out, start_step, config, enabled=main)
    end_step = config.max_steps if stop_after is None else min(config.max_steps, start_step + stop_after)
    progress = progress_bar(start_step, config.max_steps, enabled=main and config.progress)

    model.train()
    losses: list[float] = []
    step = start_step
    skipped, bad_in_row = 0, 0
    stopped_by, stop_path = None, None
    tick = time.perf_counter()
    while step < end_step:
        step_loss, samples, bad = 0.0, 0, False
        for _ in range(config.grad_accum_steps):
            batch = _to_device(next(stream), device)
            with _autocast(device, config.precision):
                loss = model(**batch).loss
            if bad or not torch.isfinite(loss):  # keep consuming the step's micro-batches, skip their backward
                bad = True
                if not fsdp:  # fsdp: every rank runs every backward (it holds collectives); the step is skipped
                    continue
            scaler.scale(loss / config.grad_accum_steps).backward()
            step_loss += loss.item() / config.grad_accum_steps
            samples += _batch_size(batch)
        skip, grad_norm = any_rank(bad), math.nan
        why = "non-finite loss or gradient"
        if not skip:
            if not fsdp:
                average_gradients(trainable.values())
            scaler.unscale_(optimizer)
            grad_norm = _clip(trainable.values(), config.max_grad_norm)
            skip = not math.isfinite(grad_norm) and not scaler.is_enabled()  # fp16: the scaler skips, rescales
        if not skip:
            guard.snapshot()
            scaler.step(optimizer)
            scaler.update()
            if any_rank(not guard.finite()):
                guard.restore()
                skip, why = True, "the update made a parameter non-finite (rolled back)"
        if skip:
            optimizer.zero_grad(set_to_none=True)
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            _warn(f"train: skipped step {step + 1}: {why} ({bad_in_row} in a row)")
            if bad_in_row >= config.max_bad_steps:
                path = save(out, step, weights, optimizer, scheduler, scaler, stream, config, run_config, prune=False)
                raise FloatingPointError(
                    f"train: {bad_in_row} optimizer steps in a row were skipped ({why}; "
                    f"train.max_bad_steps={config.max_bad_steps}); stopped after step {step}. The last good state "
                    f"is saved in {path or out / CHECKPOINT_DIR}. Lower train.lr, check the data, or use fp32."
                )
            continue
        bad_in_row = 0
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        step_loss = mean_over_ranks(step_loss)
        losses.append(step_loss)
        now = time.perf_counter()
        logger.log(step, step_loss, scheduler.get_last_lr(), optimizer, grad_norm, samples * world / (now - tick))
        tick = now
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
        if validate is not None and config.eval_every and step % config.eval_every == 0:
            with preserved_rng():
                logger.log_eval(step, validate(step))
            model.train()
        stopping = stop.requested()
        if stopping or step == end_step or (config.checkpoint_every and step % config.checkpoint_every == 0):
            path = save(
                out, step, weights, optimizer, scheduler, scaler, stream, config, run_config, prune=not stopping
            )
            if stopping:
                stopped_by, stop_path = stop.signal_name, path
                break
    if progress is not None:
        progress.close()
    logger.close(plot=config.plot and step == config.max_steps)
    return TrainResult(step, losses, start_step, out, out / "metrics.csv", logger.rows, skipped, stopped_by, stop_path)


def _warn(message: str) -> None:
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
