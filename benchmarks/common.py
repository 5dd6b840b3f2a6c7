"""Small timing helpers shared by the benchmarks: median wall time, peak memory, this machine's GEMM rate.

Every benchmark compares peers side by side in ONE process run (the machine is shared, so absolute
numbers drift; ratios measured in the same run are what we report).

    median_ms(fn, warmup=2, repeats=5)   -> (median ms, list of all ms)
    peak_memory_mb(fn)                   -> peak bytes allocated during fn, in MiB (CPU: torch profiler)
    gemm_flops(n=2048, repeats=5)        -> measured fp32 FLOP/s of a square torch.mm (the ceiling)
    gemm_workload(flops, n=2048)         -> (fn, flops): square torch.mm's totalling about ``flops``, to time
                                            the ceiling inside an interleaved run (same load as the peers)
    count_flops(fn)                      -> FLOPs of the ops torch's flop counter knows, run by fn (also under
                                            no_grad, e.g. inside ``generate``)
    interleaved_ms({name: fn}, ...)      -> {name: median ms}, runs the peers round-robin so drift hits all
    alternating_ms({name: fn}, ...)      -> the same from a plain alternating loop (a second harness)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = [
    "report",
    "median_ms",
    "interleaved_ms",
    "alternating_ms",
    "peak_memory_mb",
    "gemm_flops",
    "gemm_workload",
    "count_flops",
    "spread",
]


def _time_once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1e3


def median_ms(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> tuple[float, list[float]]:
    """Median wall-clock milliseconds of ``fn()`` after ``warmup`` untimed calls, and all samples."""
    for _ in range(warmup):
        fn()
    samples = [_time_once(fn) for _ in range(repeats)]
    return statistics.median(samples), samples


def interleaved_ms(
    fns: dict[str, Callable[[], object]],
    warmup: int = 2,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[float, list[float]]]:
    """Median ms of each function, timed round-robin (A B C A B C ...) so load changes hit every peer.

    ``clock=time.process_time`` measures this process's CPU time instead of wall time: on a machine
    shared with other jobs, with ``torch.set_num_threads(1)``, it counts only the time we actually ran.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, clock))
    return {name: (statistics.median(s), s) for name, s in samples.items()}


def alternating_ms(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[float, list[float]]]:
    """Median ms of each function from a plain loop A B C A B C ..., the first ``warmup`` rounds dropped:
    a second harness for `interleaved_ms`, which warms each function up on its own first."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            ms = _time_once(fn, clock)
            if i >= warmup:
                samples[name].append(ms)
    return {name: (statistics.median(s), s) for name, s in samples.items()}


def spread(samples: list[float]) -> float:
    """(max - min) / median of the samples: how noisy a measurement was."""
    med = statistics.median(samples)
    return (max(samples) - min(samples)) / med if med else 0.0


def peak_memory_mb(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    """Peak memory allocated by torch while ``fn()`` runs, in MiB (CUDA allocator stats or CPU profiler).

    ``setup()`` runs first, outside the measurement: use it to free what ``fn`` would otherwise free
    (e.g. ``model.zero_grad(set_to_none=True)``), since freeing memory allocated before the profiler
    started would hide allocations that reuse it.
    """
    if setup is not None:
        setup()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Replay allocation events in time order; the running sum's maximum is the peak over fn's lifetime.
    # Allocations are charged to the op that made them (its *self* memory); only frees appear as
    # "[memory]" events, so counting those alone always gave 0.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 FLOP/s of an (n x n) @ (n x n) torch.mm on this machine: 2 n^3 per product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms, _ = median_ms(lambda: torch.mm(a, b), warmup=2, repeats=repeats)
    return 2 * n**3 / (ms / 1e3)


def gemm_workload(flops: float, n: int = 2048) -> tuple[Callable[[], object], float]:
    """A function running k square (n x n) fp32 products, k chosen so it does about ``flops`` FLOPs.

    Timed in the same ``interleaved_ms`` round-robin as the models, its FLOP/s is the machine's ceiling
    under the same (shared, drifting) load. Returns the function and its exact FLOP count.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    k = max(1, round(flops / (2 * n**3)))

    def run() -> None:
        for _ in range(k):
            torch.mm(a, b)

    return run, 2.0 * n**3 * k


class _FlopCount(TorchDispatchMode):
    """Adds up ``torch.utils.flop_counter``'s formula for every dispatched op that has one (matmuls,
    convolutions, the attention kernels it registers). Unlike ``FlopCounterMode`` it tracks no modules, so
    it also counts under ``no_grad``. Ops without a formula count zero: a count is a lower bound."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` runs (a lower bound: see ``_FlopCount``), forward and any backward it calls."""
    with _FlopCount() as counter:
        fn()
    return counter.total


def report(result: dict, table: str, json_path=None) -> dict:
    """Print a benchmark's table and, if asked, write its result as JSON (creating the folder)."""
    import json
    from pathlib import Path

    print(table)
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return result
