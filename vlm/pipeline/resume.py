"""Re-running ``pvlm-train`` on an output directory that holds a run: continue it, say it is finished, or refuse.

The directory's ``run_config.yaml`` (written when the run started) is compared field by field with
the new config. Fields that may change when a run continues are listed in `RESUMABLE` (the step
budget, logging, checkpoint and evaluation cadence, progress bars, the ``eval`` section and CPU
threads): changing ``train.max_steps`` extends (or ends earlier) the same run, and its cosine
schedule is recomputed for the new length. Any other difference (a learning rate, the data, the
model) would silently train a different run on the old state, so it is refused with the fields named,
unless ``train.allow_config_change=true`` (then the differences are logged and the new config is
recorded). A run whose checkpoint already reached ``train.max_steps`` and whose adapter exists is
finished: the command says so and trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resampler.config import load_config, to_dict

from ..distributed import print0
from ..training import latest_checkpoint
from .config import RunConfig

__all__ = ["RESUMABLE", "ResumePoint", "check_resume", "config_differences"]

RUN_CONFIG = "run_config.yaml"
# dotted field names, or section prefixes ending in "."
RESUMABLE = (
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_batches",
    "train.eval_cider_samples",
    "train.progress",
    "train.tensorboard",
    "train.plot",
    "train.wandb",
    "train.wandb_project",
    "train.stop_on_signal",
    "train.allow_config_change",
    "train.resume",
    "eval.",
    "threads",
    "output_dir",  # a run directory may be moved
    "shards.progress",
    "features.batch_size",
)


@dataclass
class ResumePoint:
    checkpoint: Path
    step: int
    max_steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.max_steps


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, new value)} for every field that differs and may not change on resume."""
    old, now = _flat(to_dict(saved)), _flat(to_dict(new))
    return {
        key: (old.get(key), now.get(key))
        for key in sorted(set(old) | set(now))
        if old.get(key) != now.get(key)
        and not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)
    }


def check_resume(cfg: RunConfig) -> ResumePoint | None:
    """The checkpoint a run continues from (None: a fresh run); a ValueError for a config that may not resume it."""
    if not cfg.train.resume:
        return None
    ckpt = latest_checkpoint(cfg.out)
    if ckpt is None:
        return None
    point = ResumePoint(ckpt, int(ckpt.name.split("_")[-1]), cfg.train.max_steps)
    saved_path = cfg.out / RUN_CONFIG
    if saved_path.is_file():
        try:
            saved = load_config(RunConfig, saved_path)
        except (TypeError, ValueError) as err:
            if not cfg.train.allow_config_change:
                raise ValueError(
                    f"{saved_path} (the config of the run in {cfg.out}) cannot be read ({err}); "
                    "set train.allow_config_change=true to continue that run with this config, or use a new output_dir"
                ) from None
        else:
            _compare(saved, cfg, saved_path, point)
    if point.step > cfg.train.max_steps:
        raise ValueError(
            f"{cfg.out} holds a run at step {point.step} (checkpoint {ckpt}), past train.max_steps="
            f"{cfg.train.max_steps}; set train.max_steps >= {point.step} to continue it, or use a new output_dir"
        )
    return point


def _compare(saved: RunConfig, cfg: RunConfig, saved_path: Path, point: ResumePoint) -> None:
    changes = config_differences(saved, cfg)
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if cfg.train.allow_config_change:
        print0(f"train: continuing the run at step {point.step} with a changed config: {listed}")
        return
    state = "finished" if point.finished else f"at step {point.step} of {saved.train.max_steps}"
    raise ValueError(
        f"{cfg.out} holds a run ({state}) whose config differs in {', '.join(changes)} ({listed}; saved in "
        f"{saved_path}). Use a new output_dir for a new run, or set train.allow_config_change=true to continue "
        "this one with the new values"
    )
