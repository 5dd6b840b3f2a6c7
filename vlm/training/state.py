"""Training checkpoints: everything a resume needs to continue the same run bit for bit.

    <output_dir>/checkpoints/
      step_0000500/
        trainable.safetensors   the trainable weights (rank 0's: replicas are identical)
        optimizer.pt            optimizer, scheduler and grad-scaler state (tensors and numbers only)
        rng.pt                  every rank's python / numpy / torch (/ cuda) generator state
        state.json              step, world size, every rank's data position, the configs; written last
      latest                    the name of the newest complete step directory

Each step directory is written with `vlm.io.atomic_directory` and ``latest`` with `vlm.io.atomic_write`,
so a process killed at any moment leaves the previous checkpoint usable. Loads read and check every
file before changing anything, and ``torch.load`` runs with ``weights_only=True``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from resampler.config import to_dict

from ..distributed import barrier, gather_objects, rank, world_size
from ..io import atomic_directory, atomic_write
from .batches import BatchStream
from .config import TrainConfig

__all__ = ["CHECKPOINT_DIR", "latest_checkpoint", "save_checkpoint", "load_checkpoint", "set_seed"]

CHECKPOINT_DIR = "checkpoints"


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
    stream: BatchStream,
    config: TrainConfig,
    run_config: dict[str, Any] | None,
) -> Path | None:
    """Write ``checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it, keep the newest
    ``config.keep_checkpoints``.

    Every rank's RNG and data position are gathered to rank 0, which writes; replicas hold the same
    weights and optimizer state, so rank 0's copy stands for all. Returns the directory (None on
    other ranks).
    """
    rank_states = gather_objects({"rng": _rng_state(), "data": stream.state_dict()})
    if rank() != 0:
        barrier()
        return None
    root = output_dir / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    with atomic_directory(final) as tmp:
        weights = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
            tmp / "optimizer.pt",
        )
        torch.save([s["rng"] for s in rank_states], tmp / "rng.pt")
        state = {
            "step": step,
            "world_size": world_size(),
            "data": [s["data"] for s in rank_states],
            "trainable": sorted(trainable),
            "train_config": to_dict(config),
            "run_config": run_config,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks the dir complete
    atomic_write(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p != final)[: -config.keep_checkpoints + 1 or None]:
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, trainable, optimizer, scheduler, scaler, stream: BatchStream) -> int:
    """Restore weights, optimizer, scheduler, scaler, data position and this rank's RNG; returns the step."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != world_size():
        raise ValueError(
            f"resume: checkpoint {path} was written by {state['world_size']} processes, this run has {world_size()}; "
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
    stream.load_state_dict(state["data"][rank()])
    _set_rng_state(rng[rank()])
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
