"""Launchers: ``accelerate launch`` gives N real processes (the same run as torchrun) or a clear refusal;
every run logs its world and batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import tiny_train_command

from vlm.launch import check_launch, describe_world, requested_processes

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def test_requested_processes_reads_accelerate_command_lines(tmp_path):
    cmd = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "vlm.cli"]
    assert requested_processes([*cmd, "train", "--config", "x.yaml"]) == 2
    config = tmp_path / "acc.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 3\n")
    assert requested_processes([cmd[0], cmd[1], "launch", "--config_file", str(config), "train.py"]) == 3
    assert requested_processes(["python", "-m", "vlm.cli", "train"]) is None  # not accelerate


def test_accelerate_one_process_for_two_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    cmd = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "vlm.cli", "train"]
    with pytest.raises(ValueError, match=r"asked for 2 processes but started 1.*--multi_gpu --num_processes 2"):
        check_launch(cmd)
    check_launch([*cmd[:4], "--num_processes", "1", "-m", "vlm.cli"])  # one asked, one started: fine
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    check_launch(cmd)  # not started by accelerate: nothing to check


def test_describe_world_single_process():
    line = describe_world(8, 2)
    assert line == (
        "launch: single process, 1 process (no process group); batch 8 per rank x 2 accumulation steps x 1 = "
        "16 samples per optimizer step"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_command(tmp_path: Path, out: str) -> list[str]:
    return [*tiny_train_command(tmp_path)[1:], "train.max_steps=8", f"output_dir={tmp_path / out}"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate's console script is not installed")
def test_accelerate_cpu_two_processes_is_refused_not_run_as_one(tmp_path):
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", *_train_command(tmp_path, "cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert "accelerate launch asked for 2 processes but started 1" in proc.stderr
    assert not (tmp_path / "cpu" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path(ACCELERATE).exists(), reason="accelerate's console script is not installed")
def test_accelerate_launch_two_processes_equals_torchrun_two(tmp_path):
    from safetensors.torch import load_file

    subprocess.run(
        [sys.executable, *_train_command(tmp_path, "one"), "train.max_steps=1"],
        check=True,
        env=_env(),
        capture_output=True,
    )  # fmt: skip  (shared assets first: no two writers)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    a = subprocess.run([*torchrun, *_train_command(tmp_path, "torchrun")], env=_env(), capture_output=True, text=True)
    assert a.returncode == 0, a.stderr[-3000:]
    accelerate = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    b = subprocess.run(
        [*accelerate, *_train_command(tmp_path, "accelerate")], env=_env(), capture_output=True, text=True
    )
    assert b.returncode == 0, b.stderr[-3000:]
    global_batch = "batch 8 per rank x 1 accumulation step x 2 = 16 samples per optimizer step"
    assert f"launch: torchrun, 2 processes (gloo); {global_batch}" in a.stdout
    assert f"launch: accelerate, 2 processes (gloo); {global_batch}" in b.stdout
    x = load_file(str(tmp_path / "torchrun" / "adapter" / "adapter.safetensors"))
    y = load_file(str(tmp_path / "accelerate" / "adapter" / "adapter.safetensors"))
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)

    def losses(run):
        return [row.split(",")[1] for row in (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]]

    assert losses("torchrun") == losses("accelerate") and len(losses("torchrun")) == 8
