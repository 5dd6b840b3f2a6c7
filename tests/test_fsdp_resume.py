"""``train.distributed=fsdp`` survives ``kill -9``: two ranks killed mid-run resume to the uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time

import pytest
import torch
from test_fsdp import env, torchrun, torchrun_command

FSDP = {"distributed": "fsdp", "max_steps": 8, "checkpoint_every": 1, "keep_checkpoints": 2}


def losses(run):
    return [(r["step"], r["loss"]) for r in csv.DictReader((run / "metrics.csv").read_text().splitlines())]


@pytest.mark.slow
def test_fsdp_killed_with_sigkill_resumes_to_the_same_run(tmp_path):
    full = torchrun(tmp_path, [("full", "prefix", 2, FSDP, {})])

    # The same run, slowed down, killed (every process of the launch, SIGKILL) after its third checkpoint.
    cmd = torchrun_command(tmp_path, [("cut", "prefix", 2, FSDP, {"delay": 0.4})], script="slow.py")
    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_0000003" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its third checkpoint"
        time.sleep(0.05)
    for r in range(2):  # the workers (each in its own session), then the launcher
        os.kill(int((tmp_path / f"pid{r}").read_text()), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut-rank0.pt").exists()  # it really died mid-run

    again = torchrun(tmp_path, [("cut", "prefix", 2, FSDP, {})])  # the same command again: resumes
    assert 3 <= 8 - len(again["cut"][0]["losses"]) < 8
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # every logged step, exactly
    for r in range(2):
        for name, want in full["full"][r]["params"].items():
            assert torch.equal(again["cut"][r]["params"][name], want), name  # bit-identical
