"""Training checkpoints: everything a resume needs to continue the same run bit for bit.

    <output_dir>/checkpoints/
      step_0000500/
        trainable.safetensors   the trainable weights (rank 0's: replicas are identical)
        optimizer.pt            optimizer, scheduler and grad-scaler state (tensors and numbers only)
        rng.pt                  every rank's python / numpy / torch (/ cuda) generator state
        state.json              step, world size, every rank's data position, the configs, and the sha256
                                and size of the three files above (`vlm.integrity`); written last
      latest                    the name of the newest step directory (a hint for people; resume scans)

Writing: `save_checkpoint` is the one write path (periodic, final and stop checkpoints, and any later
caller such as a signal handler). It refuses a state with a non-finite weight or optimizer tensor,
serialises every file to bytes, writes them into a `vlm.io.atomic_directory` (an ``OSError`` names the
file and the cause), and only then prunes older steps, and never a newer one, and never for a stop
checkpoint (``prune=False``).

Reading: `find_checkpoint` walks the ``step_*`` directories newest first and returns the first that
verifies: ``state.json`` parses and has the expected fields, every file matches its record, the
tensors are finite. Anything else is skipped with a warning that says why (an incomplete or corrupt
step, a ``latest`` that is unreadable or names an older step), so a resume always takes the newest
verified step. ``torch.load`` runs with ``weights_only=True`` on bytes that were verified first.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from resampler.config import to_dict

from ..distributed import any_rank, barrier, gather_objects, rank, world_size
from ..integrity import IntegrityError, check_record, digest, read_verified
from ..io import atomic_directory, atomic_write, remove_stale_temporaries, write_bytes
from .batches import BatchStream
from .config import TrainConfig

__all__ = [
    "CHECKPOINT_DIR",
    "Checkpoint",
    "find_checkpoint",
    "latest_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "non_finite_count",
    "set_seed",
]

CHECKPOINT_DIR = "checkpoints"
FILES = ("trainable.safetensors", "optimizer.pt", "rng.pt")
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_MAX_STATE_BYTES = 64 << 20


@dataclass
class Checkpoint:
    """A verified checkpoint, read into memory: what `load_checkpoint` restores."""

    path: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: list[dict[str, Any]]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def non_finite_count(tensors) -> int:
    """Elements that are NaN or +-inf over the floating-point tensors of a (nested) structure."""
    if isinstance(tensors, torch.Tensor):
        return int((~torch.isfinite(tensors)).sum()) if tensors.is_floating_point() else 0
    if isinstance(tensors, dict):
        return sum(non_finite_count(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(non_finite_count(v) for v in tensors)
    return 0


# ----------------------------------------------------------------------------------------------
# Writing


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
    *,
    prune: bool = True,
) -> Path | None:
    """Write ``checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it and, with ``prune``, keep
    the newest ``config.keep_checkpoints`` of the steps up to this one.

    Every rank's RNG and data position are gathered to rank 0, which writes; replicas hold the same
    weights and optimizer state, so rank 0's copy stands for all. A non-finite weight or optimizer
    tensor on any rank raises FloatingPointError on every rank and writes nothing. Returns the
    directory (None on other ranks).
    """
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
    opt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    bad = non_finite_count(weights) + non_finite_count(opt["optimizer"]["state"])
    if any_rank(bad > 0):
        raise FloatingPointError(
            f"train: not saving a checkpoint of step {step}: {bad} weight or optimizer values are not finite; "
            f"the checkpoints already in {Path(output_dir) / CHECKPOINT_DIR} are kept"
        )
    rank_states = gather_objects({"rng": _rng_state(), "data": stream.state_dict()})
    if rank() != 0:
        barrier()
        return None
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    blobs = {
        "trainable.safetensors": save_safetensors(weights),
        "optimizer.pt": _torch_bytes(opt),
        "rng.pt": _torch_bytes([s["rng"] for s in rank_states]),
    }
    state = {
        "step": step,
        "world_size": world_size(),
        "data": [s["data"] for s in rank_states],
        "trainable": sorted(trainable),
        "train_config": to_dict(config),
        "run_config": run_config,
        "files": {name: digest(data) for name, data in blobs.items()},
    }
    remove_stale_temporaries(root)
    with atomic_directory(final) as tmp:
        for name, data in blobs.items():
            write_bytes(tmp / name, data)
        write_bytes(tmp / "state.json", json.dumps(state, indent=1).encode())  # last: marks the dir complete
    _write_pointer(root, final.name)
    if prune:
        older = [p for n, p in _step_dirs(root) if n < step]
        for old in older[: max(len(older) - config.keep_checkpoints + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_pointer(root: Path, name: str) -> None:
    pointer = root / "latest"
    if pointer.is_symlink() or (pointer.exists() and not pointer.is_file()):
        aside = root / f"latest.invalid-{name}"
        pointer.rename(aside)  # not ours to delete, and in the way of the pointer
        _warn(f"train: {pointer} was not a pointer file; moved it to {aside}")
    atomic_write(pointer, name)


# ----------------------------------------------------------------------------------------------
# Finding and reading


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the real directories named ``step_<digits>`` under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint under ``output_dir/checkpoints`` that verifies, read into memory; None
    when there is none at all. Every newer step that does not verify is skipped with a warning
    naming the reason; when steps exist but none verifies, a ValueError lists them."""
    root = Path(output_dir) / CHECKPOINT_DIR
    steps = _step_dirs(root)
    problems = []
    for _, path in reversed(steps):
        try:
            found = read_checkpoint(path)
        except (ValueError, OSError) as err:
            problems.append(f"{path.name}: {err}")
            _warn(f"train: skipping checkpoint {path}: {err}")
            continue
        _check_pointer(root, path.name)
        return found
    if problems:
        raise ValueError(
            f"train: no checkpoint under {root} verifies ({'; '.join(problems)}); "
            "move them away to start afresh, or restore them from a copy"
        )
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest verified checkpoint directory under ``output_dir/checkpoints``, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = find_checkpoint(output_dir)
        except ValueError:
            return None
    return None if found is None else found.path


def _check_pointer(root: Path, newest: str) -> None:
    pointer = root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return
    try:
        named = read_verified(root, "latest", None, max_size=256).decode("utf-8").strip()
    except (ValueError, OSError) as err:
        _warn(f"train: ignoring an unreadable {pointer} ({err}); the newest verified checkpoint is {newest}")
        return
    if named != newest:
        _warn(f"train: {pointer} names {named!r}, but the newest verified checkpoint is {newest}: using {newest}")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one step directory; a ValueError (IntegrityError) says what is wrong."""
    path = Path(path)
    state = _read_state(path)
    record = state.get("files")
    if record is None:
        _warn(f"train: {path} was written before checkpoints recorded sha256 digests; its files are not verified")
    else:
        check_record(record, f"{path}/state.json")
        if set(record) != set(FILES):
            raise IntegrityError(f"{path}/state.json records {sorted(record)}, expected {sorted(FILES)}")
    blobs = {name: read_verified(path, name, None if record is None else record[name]) for name in FILES}
    weights = _parse(path / "trainable.safetensors", lambda: load_safetensors(blobs["trainable.safetensors"]))
    opt = _parse(path / "optimizer.pt", lambda: _torch_load(blobs["optimizer.pt"]))
    rng = _parse(path / "rng.pt", lambda: _torch_load(blobs["rng.pt"]))
    if sorted(weights) != state["trainable"]:
        raise IntegrityError(f"{path}/trainable.safetensors does not hold the tensors state.json lists")
    if not (isinstance(opt, dict) and {"optimizer", "scheduler", "scaler"} <= set(opt)):
        raise IntegrityError(f"{path}/optimizer.pt does not hold optimizer, scheduler and scaler states")
    if not isinstance(rng, list):
        raise IntegrityError(f"{path}/rng.pt does not hold a list of generator states")
    bad = non_finite_count(weights) + non_finite_count(opt["optimizer"].get("state", {}))
    if bad:
        raise IntegrityError(f"{path} holds {bad} non-finite weight or optimizer values; it is not a good state")
    return Checkpoint(path, state, weights, opt, rng)


_STATE_FIELDS = {"step": int, "world_size": int, "data": list, "trainable": list}


def _read_state(path: Path) -> dict[str, Any]:
    where = path / "state.json"
    try:
        state = json.loads(read_verified(path, "state.json", None, max_size=_MAX_STATE_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise IntegrityError(f"{where} is unreadable ({type(err).__name__}): the checkpoint is incomplete") from None
    if not isinstance(state, dict):
        raise IntegrityError(f"{where} is not a JSON object: the checkpoint is incomplete")
    for key, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise IntegrityError(f"{where}: {key!r} is missing or not a {kind.__name__}: the checkpoint is incomplete")
    if f"step_{state['step']:07d}" != path.name or state["world_size"] < 1:
        raise IntegrityError(
            f"{where}: step {state['step']} and world_size {state['world_size']} do not fit {path.name}"
        )
    if not all(isinstance(n, str) for n in state["trainable"]):
        raise IntegrityError(f"{where}: 'trainable' must list parameter names")
    return state


def _torch_load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parse(where: Path, read) -> Any:
    """``read()``; a cut or corrupt file becomes a ValueError naming it (a pickle that would run code
    still fails loudly as ``pickle.UnpicklingError``, from ``weights_only=True``)."""
    from safetensors import SafetensorError

    try:
        return read()
    except (SafetensorError, RuntimeError, EOFError, OSError) as err:
        raise IntegrityError(f"{where} is truncated or corrupt ({str(err).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------------------------
# Restoring


def load_checkpoint(path_or_checkpoint, trainable, optimizer, scheduler, scaler, stream: BatchStream) -> int:
    """Restore weights, optimizer, scheduler, scaler, data position and this rank's RNG; returns the step.

    Takes a directory (read and verified here) or a `Checkpoint` from `find_checkpoint`. Everything
    is checked against this run before anything changes: a mismatch loads nothing."""
    ckpt = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else read_checkpoint(path_or_checkpoint)
    path, state = ckpt.path, ckpt.state
    if state["world_size"] != world_size():
        raise ValueError(
            f"resume: checkpoint {path} was written by {state['world_size']} processes, this run has {world_size()}; "
            "resume with the same number of processes or start a new output_dir"
        )
    if len(state["data"]) != world_size() or len(ckpt.rng) != world_size():
        raise IntegrityError(f"resume: {path} does not hold a data position and generator state for every rank")
    if state["trainable"] != sorted(trainable):
        missing = set(state["trainable"]) ^ set(trainable)
        raise ValueError(f"resume: trainable parameters differ from checkpoint {path}: {sorted(missing)[:5]}...")
    for name, p in trainable.items():
        if ckpt.weights[name].shape != p.shape:
            raise ValueError(
                f"resume: {path}/trainable.safetensors holds {name!r} with shape {tuple(ckpt.weights[name].shape)}, "
                f"the model has {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(ckpt.weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt.optimizer["optimizer"])
    scheduler.load_state_dict(ckpt.optimizer["scheduler"])
    scaler.load_state_dict(ckpt.optimizer["scaler"])
    stream.load_state_dict(state["data"][rank()])
    _set_rng_state(ckpt.rng[rank()])
    return ckpt.step


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


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
