"""Training checkpoints of ``train.distributed=fsdp``: `torch.distributed.checkpoint` (DCP), sharded.

    <output_dir>/checkpoints/
      step_0000500/
        shards/          DCP: every rank writes its own shard of the trainable weights and of the
                         optimizer state (keyed by parameter name), plus ``.metadata``
        extra.pt         scheduler and grad-scaler state (tensors and numbers only)
        rng.pt           every rank's python / numpy / torch (/ cuda) generator state
        state.json       step, world size, every rank's data position, the configs, "format"; written last
      latest             the name of the newest complete step directory

Atomic: rank 0 creates the step's temporary directory (`vlm.io.atomic_directory`), every rank writes
its shard into it, and rank 0 renames it to ``step_XXXXXXX`` only after DCP's save returned on every
rank and the other files are written; a run killed at any moment leaves the previous step usable.
With several machines, ``output_dir`` must be on a file system they share.

Resharding: DCP stores each tensor with its global shape, so a checkpoint of N ranks loads on M ranks,
or into the plain model of one process without a process group (``dcp.load(no_dist)``). The data
position is then rank 0's (global-batch positions are the same on every rank: keep
``data.batch_size`` x world size unchanged for an exact continuation) and the generators keep their
fresh seeding (a dropout stream of one rank has no counterpart on another world size). Only the
trainable weights are stored; frozen ones come from the base model, as in `vlm.training.state`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resampler.config import to_dict

from ..distributed import barrier, broadcast_object, gather_objects, is_distributed, print0, rank, world_size
from ..integrity import IntegrityError, check_record, digest, read_verified
from ..io import atomic_directory, write_bytes
from .batches import BatchStream
from .config import TrainConfig
from .state import (
    CHECKPOINT_DIR,
    _parse,
    _rng_state,
    _set_rng_state,
    _step_dirs,
    _torch_bytes,
    _torch_load,
    _write_pointer,
)

__all__ = ["FORMAT", "is_sharded_checkpoint", "find_checkpoint", "save_checkpoint", "load_checkpoint", "load_weights"]

FORMAT = "fsdp-dcp"
SHARDS = "shards"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether a complete step directory was written by this module."""
    state = Path(path) / "state.json"
    try:
        return state.is_file() and json.loads(state.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False  # cut or not ours: not a complete sharded checkpoint


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete sharded step directory under ``output_dir/checkpoints``, or None."""
    complete = [path for _, path in _step_dirs(Path(output_dir) / CHECKPOINT_DIR) if is_sharded_checkpoint(path)]
    return complete[-1] if complete else None


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)  # not strict: buffers are not stored


def _dcp(method: str, state: dict[str, Any], path: Path) -> None:
    """``dcp.save`` / ``dcp.load`` of ``state`` at ``path``, without a process group in a lone process."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # a lone process is meant to use no process group: say nothing
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        getattr(dcp, method)(state, checkpoint_id=path, no_dist=not is_distributed())


def _trainable_names(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The DCP state: trainable weights and (if given) optimizer state, by parameter name (DTensors under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = set(_trainable_names(model))
    weights = get_model_state_dict(model, options=_options())
    state = {"model": {k: v for k, v in weights.items() if k in names}}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_options())
    return state


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    scaler, stream: BatchStream, config: TrainConfig, run_config: dict | None,
                    prune: bool = True) -> Path | None:  # fmt: skip
    """Write ``checkpoints/step_XXXXXXX`` (every rank calls), point ``latest`` at it, keep the newest
    ``config.keep_checkpoints`` (older ones only; none when ``prune=False``). Returns the directory on rank 0, None elsewhere. The arguments are
    those of `vlm.training.state.save_checkpoint`, with the model in place of the trainable dict."""
    state = _state(model, optimizer)
    rank_states = gather_objects({"rng": _rng_state(), "data": stream.state_dict()})
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(final)) if rank() == 0 else None
        tmp = Path(broadcast_object(None if tmp is None else str(tmp)))
        _dcp("save", state, tmp / SHARDS)
        if rank() == 0:
            blobs = {
                "extra.pt": _torch_bytes({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}),
                "rng.pt": _torch_bytes([s["rng"] for s in rank_states]),
            }
            for name, data in blobs.items():
                write_bytes(tmp / name, data)
            record = {
                "format": FORMAT,
                "step": step,
                "world_size": world_size(),
                "data": [s["data"] for s in rank_states],
                "trainable": sorted(state["model"]),
                "train_config": to_dict(config),
                "run_config": run_config,
                "files": {name: digest(data) for name, data in blobs.items()},  # the shards: DCP's own metadata
            }
            write_bytes(tmp / "state.json", json.dumps(record, indent=1).encode())  # last: marks the dir complete
    if rank() == 0:
        _write_pointer(root, final.name)
        older = [p for s, p in _step_dirs(root) if s < step] if prune else []
        for old in older[: -config.keep_checkpoints + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final if rank() == 0 else None


def _read_state(path: Path, model: nn.Module) -> dict[str, Any]:
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"resume: {path} was not written with train.distributed=fsdp (no sharded state.json); resume it "
            "with train.distributed=ddp and the same number of processes, or start a new output_dir"
        )
    state = json.loads((path / "state.json").read_text())
    names = _trainable_names(model)
    if state["trainable"] != names:
        differ = sorted(set(state["trainable"]) ^ set(names))
        raise ValueError(f"resume: trainable parameters differ from checkpoint {path}: {differ[:5]}...")
    return state


def _read_small(path: Path, state: dict, name: str) -> Any:
    """``extra.pt`` / ``rng.pt`` after their digest in ``state.json`` (`vlm.integrity`)."""
    record = check_record(state.get("files", {}), f"{path}/state.json").get(name)
    if record is None:
        raise IntegrityError(f"{path}/state.json records no digest for {name}: the checkpoint is incomplete")
    data = read_verified(path, name, record)
    return _parse(path / name, lambda: _torch_load(data))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler, stream: BatchStream) -> int:
    """Restore weights, optimizer, scheduler, scaler, data position (and RNG on the same world size)
    from a sharded checkpoint, whatever world size wrote it; returns its step (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = _read_state(path, model)
    extra, rng = (_read_small(path, state, name) for name in ("extra.pt", "rng.pt"))
    target = _state(model, optimizer)
    try:
        _dcp("load", target, path / SHARDS)
    except Exception as err:  # DCP wraps every reader error in its own CheckpointException
        raise ValueError(f"resume: {path / SHARDS} could not be read ({str(err).splitlines()[0][:200]})") from None
    set_model_state_dict(model, target["model"], options=_options())
    set_optimizer_state_dict(model, optimizer, target["optim"], options=_options())
    scheduler.load_state_dict(extra["scheduler"])
    scaler.load_state_dict(extra["scaler"])
    if state["world_size"] == world_size():
        stream.load_state_dict(state["data"][rank()])
        _set_rng_state(rng[rank()])
    else:
        stream.load_state_dict(state["data"][0])
        print0(
            f"resume: {path} was written by {state['world_size']} processes, this run has {world_size()}: "
            "weights and optimizer state resharded, data position of rank 0, generators freshly seeded"
        )
    return int(state["step"])


def load_weights(path: str | Path, model: nn.Module) -> int:
    """Only the trainable weights of a sharded checkpoint into ``model`` (sharded or plain, e.g. one CPU
    process to export an adapter with ``model.save_adapter``); returns the checkpoint's step."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    path = Path(path)
    state = _read_state(path, model)
    target = _state(model, None)
    _dcp("load", target, path / SHARDS)
    set_model_state_dict(model, target["model"], options=_options())
    return int(state["step"])
