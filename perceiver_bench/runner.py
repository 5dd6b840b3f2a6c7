"""Run one benchmark task (or all): load its config, train, evaluate, write the JSON record and table row."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import RunContext, TaskResult, seed_everything, update_results_table, write_record
from .config import BenchConfig, load_task_config

__all__ = ["TASKS", "TaskSpec", "run_task", "run_config"]


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    module: str
    stands_in_for: str


TASKS: dict[str, TaskSpec] = {
    "digits": TaskSpec("B1", "digits", "ImageNet from raw pixels + Fourier features"),
    "permuted_digits": TaskSpec("B2", "digits", "permuted ImageNet"),
    "point_clouds": TaskSpec("B3", "point_clouds", "ModelNet40"),
    "audio": TaskSpec("B4", "audio", "AudioSet (raw audio, multi-label)"),
    "bytes_mlm": TaskSpec("B5", "bytes_tasks", "Perceiver IO byte-level masked LM"),
    "bytes_classify": TaskSpec("B6", "bytes_tasks", "byte-level GLUE / IMDb"),
    "flow": TaskSpec("B7", "flow", "Sintel / KITTI optical flow"),
    "multimodal": TaskSpec("B8", "multimodal", "Kinetics multimodal autoencoding"),
    "multitask": TaskSpec("B9", "multitask", "multi-task GLUE queries"),
    "entities": TaskSpec("B10", "entities", "StarCraft II entity encoder"),
    "mirror_copy": TaskSpec("B11", "mirror_copy", "Perceiver AR copy / long context"),
    "resampler_media": TaskSpec("B12", "resampler_media", "Flamingo Perceiver Resampler"),
    "scaling": TaskSpec("B13", "scaling", "the O(M*N + L*N^2) cost claim"),
}


def _task_runner(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown benchmark task {task!r}; known: {', '.join(TASKS)}")
    module = importlib.import_module(f".{TASKS[task].module}", __package__)
    return module.RUNNERS[task]


def run_config(
    cfg: BenchConfig,
    *,
    out_dir: Path | None = None,
    results_doc: Path | None = None,
    figures_dir: Path | None = None,
) -> TaskResult:
    """Run ``cfg`` with its seed; write ``<out_dir>/<task>-<size>.json`` and the doc's table row if given."""
    run = _task_runner(cfg.task)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    result = run(cfg, RunContext(figures_dir=figures_dir, record_dirs=[out_dir] if out_dir else []))
    result.extra.setdefault("wall_seconds", round(time.perf_counter() - start, 2))
    if out_dir is not None:
        write_record(result, cfg, out_dir)
    if results_doc is not None:
        update_results_table(results_doc, TASKS[cfg.task].task_id, result, cfg)
    return result


def run_task(
    task: str,
    size: str = "smoke",
    overrides: list[str] | None = None,
    *,
    out_dir: Path | None = None,
    results_doc: Path | None = None,
    figures_dir: Path | None = None,
    threads: int | None = None,
) -> TaskResult:
    """The task's shipped config (``perceiver_bench/configs/<task>.yaml``) at ``size`` plus overrides, run;
    see ``run_config``."""
    if threads:
        torch.set_num_threads(threads)
    cfg = load_task_config(task, size, overrides)
    if cfg.task != task:
        raise ValueError(f"perceiver_bench/configs/{task}.yaml: its {size}.task is {cfg.task!r}, expected {task!r}")
    return run_config(cfg, out_dir=out_dir, results_doc=results_doc, figures_dir=figures_dir)
