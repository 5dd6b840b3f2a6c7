"""Which launcher started this run, whether it started the processes it was asked for, and the batch it makes.

Two launchers give N real processes, and both reach `vlm.distributed.init_distributed` through the
environment torch's elastic agent exports (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):

    torchrun --standalone --nproc_per_node 2 -m vlm.cli train ...
    accelerate launch --multi_gpu --num_processes 2 -m vlm.cli train ...     (gloo ranks on a CPU machine)

``accelerate launch --cpu --num_processes 2`` (or ``--num_processes 2`` without ``--multi_gpu`` on a
machine without GPUs, or a config file saying ``distributed_type: MULTI_CPU``) starts ONE process:
accelerate runs multi-CPU jobs through ``mpirun`` only, and exports nothing that says how many
processes were asked for. `check_launch` therefore reads the ``accelerate launch`` command line of
the parent process (and the accelerate config file it names or the default one) with accelerate's own
parser, and refuses a run whose world is smaller than the processes requested, naming the launch
commands that work. `describe_world` is the line every run logs at start: launcher, world size,
per-rank and global batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .distributed import world_size

__all__ = ["launched_by", "requested_processes", "check_launch", "describe_world"]


def launched_by() -> str | None:
    """``"accelerate"``, ``"torchrun"`` or None (a plain process)."""
    if any(key.startswith("ACCELERATE_") for key in os.environ):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    return None


def _parent_command(pid: int | None = None) -> list[str]:
    path = Path(f"/proc/{os.getppid() if pid is None else pid}/cmdline")
    try:
        return [a for a in path.read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:  # not Linux, or the parent is gone
        return []


def requested_processes(command: list[str] | None = None) -> int | None:
    """The number of processes an ``accelerate launch`` command line asks for (its flags, else its config
    file, else accelerate's default config), or None when ``command`` is not ``accelerate launch``."""
    command = _parent_command() if command is None else command
    if "launch" not in command or not any(Path(a).name.startswith("accelerate") for a in command):
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(command[command.index("launch") + 1 :])
    except SystemExit:  # a command line accelerate itself would reject
        return None
    if args.num_processes is not None:
        return int(args.num_processes)
    from accelerate.commands.config import default_config_file
    from accelerate.commands.config.config_args import load_config_from_file

    config_file = args.config_file or default_config_file
    if not Path(config_file).is_file():
        return None
    return int(getattr(load_config_from_file(config_file), "num_processes", 1) or 1)


def check_launch(command: list[str] | None = None) -> None:
    """Refuse a run whose launcher was asked for more processes than this world has (``command``: the
    launcher's command line; default: the parent process's)."""
    if launched_by() != "accelerate":
        return
    wanted, world = requested_processes(command), world_size()
    if wanted is not None and wanted > world:
        raise ValueError(
            f"accelerate launch asked for {wanted} processes but started {world}: accelerate runs several CPU "
            "processes only through mpirun (--cpu, or no --multi_gpu on a machine without GPUs). Use "
            f"`accelerate launch --multi_gpu --num_processes {wanted} -m vlm.cli train ...` (gloo ranks on CPU) "
            f"or `torchrun --standalone --nproc_per_node {wanted} -m vlm.cli train ...`"
        )


def describe_world(batch_size: int, grad_accum_steps: int, backend: str | None = None) -> str:
    """``launch: torchrun, 2 processes (gloo); batch 8 per rank x 1 accumulation step x 2 = 16 per optimizer step``."""
    import torch.distributed as dist

    world = world_size()
    if backend is None:
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "no process group"
    who = launched_by() or "single process"
    return (
        f"launch: {who}, {world} process{'es' if world > 1 else ''} ({backend}); batch {batch_size} per rank x "
        f"{grad_accum_steps} accumulation step{'s' if grad_accum_steps > 1 else ''} x {world} = "
        f"{batch_size * grad_accum_steps * world} samples per optimizer step"
    )
