"""Standalone Perceiver benchmarks B1-B13 (``perceiver-bench run <task>|all --size smoke|full``).

Each task module holds a fixed-seed data generator (or a loader of data shipped with an installed
package), the model config, the metric and a trivial baseline; every model comes from the library's
public Perceiver / Perceiver IO / Perceiver AR / resampler classes.
"""

from .common import TaskResult
from .config import BenchConfig, DataConfig, ModelConfig, TaskConfigs, TrainConfig, load_task_config
from .runner import TASKS, run_config, run_task

__all__ = [
    "BenchConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "TaskConfigs",
    "TaskResult",
    "TASKS",
    "load_task_config",
    "run_config",
    "run_task",
]
