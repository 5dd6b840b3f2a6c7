"""``perceiver-bench``: run the standalone Perceiver benchmarks B1-B13.

    perceiver-bench list
    perceiver-bench run digits --size smoke          # seconds
    perceiver-bench run digits --size full           # minutes on 2 CPU cores
    perceiver-bench run all --size full --docs docs  # every task; also update docs/benchmarks.md + figures
    perceiver-bench run digits train.steps=100 model.num_latents=16   # config overrides

Each run writes ``<out>/<task>-<size>.json`` (default out: runs/perceiver-bench) and its plots to
``<out>/figures``; only with ``--docs DIR`` does it replace the task's row in DIR/benchmarks.md and
write the plots to DIR/figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .runner import TASKS, run_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perceiver-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the tasks")
    run = sub.add_parser("run", help="run a task or all")
    run.add_argument("task", help=f"one of: all, {', '.join(TASKS)}")
    run.add_argument("overrides", nargs="*", help="section.field=value config overrides (value parsed as YAML)")
    run.add_argument("--size", choices=["smoke", "full"], default="smoke")
    run.add_argument("--out", type=Path, default=Path("runs/perceiver-bench"), help="directory of the JSON records")
    run.add_argument(
        "--docs", type=Path, default=None, help="also update DIR/benchmarks.md and DIR/figures (e.g. --docs docs)"
    )
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these models are small, and on a shared 2-core machine one thread "
        "ran a training step 17x faster than two)",
    )
    args, extra = parser.parse_known_args(argv)  # overrides may also come after the options
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if args.command != "run":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("PERCEIVER_BENCH_VERBOSE", "1")

    if args.command == "list":
        for name, spec in TASKS.items():
            print(f"{spec.task_id:>4}  {name:<16} {spec.stands_in_for}")
        return 0

    tasks = list(TASKS) if args.task == "all" else [args.task]
    if args.task != "all" and args.task not in TASKS:
        parser.error(f"unknown task {args.task!r}; known: all, {', '.join(TASKS)}")
    if args.task == "all" and args.overrides:
        parser.error("config overrides apply to a single task, not to 'all'")
    doc = None if args.docs is None else args.docs / "benchmarks.md"
    figures = args.out / "figures" if args.docs is None else args.docs / "figures"
    failures = 0
    for task in tasks:
        print(f"== {TASKS[task].task_id} {task} ({args.size})", flush=True)
        try:
            result = run_task(
                task,
                args.size,
                args.overrides,
                out_dir=args.out,
                results_doc=doc,
                figures_dir=figures,
                threads=args.threads,
            )
        except Exception:  # keep going through 'all'; the traceback says what broke
            traceback.print_exc()
            failures += 1
            continue
        status = "met" if result.target_met else "NOT met"
        print(
            f"   {result.metric_name} = {result.metric:.4g} (baseline {result.baseline_name} "
            f"{result.baseline:.4g}); target {result.target}: {status}; {result.parameters:,} params, "
            f"train {result.train_seconds:.1f} s, {result.throughput:.1f} ex/s",
            flush=True,
        )
        for key, value in result.extra.items():
            print(f"   {key}: {value}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
