"""How many torch CPU threads a run uses: ``threads: N`` takes N; ``threads: 0`` (auto) takes the idle cores.

Why auto looks at the machine: the models of the embedded default are tiny, so each op is a fraction
of a millisecond and every op ends at a barrier of all torch threads. On idle cores a second thread
speeds a step up; on a core another process is using, that thread is descheduled for whole
time slices and every barrier waits for it, so the step slows down several times over
(docs/embedded_default.md has the measurements). Auto therefore counts the cores that are idle
*now*: it reads the kernel's CPU counters (``/proc/stat``) twice, a short interval apart, and uses
the idle ones among the cores this process may run on, at least one and at most torch's default
(its thread count when this module was imported: one per physical core unless set before).

It leaves torch's thread count as it is where the user or the launcher chose already
(``OMP_NUM_THREADS`` is set, as torchrun does for several processes per machine) and where
``/proc/stat`` does not exist (not Linux).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

__all__ = ["busy_cores", "choose_threads", "set_threads"]

_STAT = Path("/proc/stat")

log = logging.getLogger(__name__)
_TORCH_DEFAULT = torch.get_num_threads()  # before anything in this process set it


def _cpu_times(stat: Path) -> tuple[int, int]:
    """(idle, total) jiffies of all cores, from the aggregate ``cpu`` line of ``/proc/stat``."""
    fields = stat.read_text().split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"{stat}: no aggregate cpu line")
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return values[3] + values[4], sum(values)


def busy_cores(interval: float = 0.25, stat: Path = _STAT) -> float | None:
    """Cores in use by any process over the next ``interval`` seconds (``None``: no ``/proc/stat``)."""
    try:
        idle0, total0 = _cpu_times(stat)
        time.sleep(interval)
        idle1, total1 = _cpu_times(stat)
    except (OSError, ValueError):
        return None
    if total1 <= total0:
        return 0.0
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / (total1 - total0))


def choose_threads(requested: int, *, busy: float | None = None) -> tuple[int, str]:
    """(threads, why) for a ``threads`` setting; ``busy`` (cores in use) is measured when not given."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = auto), got {requested}")
    if requested:
        return requested, "as configured"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS is set"  # left as the user or launcher set it
    busy = busy_cores() if busy is None else busy
    if busy is None:
        return torch.get_num_threads(), "unchanged (no /proc/stat)"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = usable - int(busy + 0.5)  # a core counts as busy when more than half of it was in use
    threads = max(1, min(idle, _TORCH_DEFAULT))
    return threads, f"auto: {max(idle, 0)} of {usable} cores idle"


def set_threads(requested: int) -> int:
    """Apply `choose_threads` to torch (logged at INFO: the console scripts print it); returns the count."""
    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    log.info("threads: %d (%s)", threads, why)
    return threads
