"""SIGINT/SIGTERM during `train`: the step finishes, a checkpoint is written at that step, and a re-run
continues to exactly the uninterrupted result; a second signal aborts at once. Validation and console lines."""

from __future__ import annotations

import csv
import os
import random
import signal

import numpy as np
import pytest
import torch
from test_train import make, quiet

from vlm.training import latest_checkpoint, train
from vlm.training.interrupt import TrainingAborted, exit_status


class SignalAt:
    """An EpochLoader that sends ``sig`` to this very process when it hands out the given batches
    (counted over the whole run): a real signal, delivered to the real handler mid-step."""

    def __init__(self, loader, at: tuple[int, ...], sig=signal.SIGINT) -> None:
        self.loader, self.at, self.sig, self.count = loader, at, sig, 0

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def __iter__(self):
        for batch in self.loader:
            for _ in range(self.at.count(self.count)):
                os.kill(os.getpid(), self.sig)
            self.count += 1
            yield batch


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sigint_checkpoints_the_interrupted_step_and_a_rerun_matches_the_uninterrupted_run(tmp_path):
    config = quiet(max_steps=10, warmup_steps=3, checkpoint_every=4)
    full, loader = make(dropout=0.2)
    ref = train(full, loader, config, tmp_path / "full")

    cut, loader = make(dropout=0.2)
    first = train(cut, SignalAt(loader, at=(6,)), config, tmp_path / "cut")  # batch 6 feeds step 7
    assert first.stopped_by == "SIGINT" and first.step == 7
    assert first.stop_checkpoint == latest_checkpoint(tmp_path / "cut")
    assert first.stop_checkpoint.name == "step_0000007"  # not on the every-4 cadence: the interrupted step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    again, loader = make(dropout=0.2)  # a fresh process: fresh weights and RNG
    torch.manual_seed(99)
    second = train(again, loader, config, tmp_path / "cut")
    assert second.resumed_from == 7 and second.stopped_by is None
    assert first.losses + second.losses == ref.losses  # exact
    want, got = trainable(full), trainable(again)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_sigterm_stops_the_same_way_with_status_143(tmp_path):
    model, loader = make()
    result = train(model, SignalAt(loader, at=(2,), sig=signal.SIGTERM), quiet(max_steps=10), tmp_path)
    assert result.stopped_by == "SIGTERM" and result.step == 3
    assert latest_checkpoint(tmp_path).name == "step_0000003"
    assert exit_status("SIGTERM") == 143 and exit_status("SIGINT") == 130


def test_second_signal_aborts_at_once_without_a_checkpoint_of_the_step(tmp_path):
    model, loader = make()
    with pytest.raises(TrainingAborted):
        train(model, SignalAt(loader, at=(4, 4)), quiet(max_steps=10, checkpoint_every=2), tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_0000004"  # the last cadence checkpoint, nothing after
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stop_on_signal_false_leaves_the_default_handler(tmp_path):
    model, loader = make()
    with pytest.raises(KeyboardInterrupt):
        train(model, SignalAt(loader, at=(2,)), quiet(max_steps=10, stop_on_signal=False), tmp_path)


def test_validation_is_logged_and_leaves_the_run_unchanged(tmp_path):
    plain_model, loader = make(dropout=0.2)
    plain = train(plain_model, loader, quiet(max_steps=8), tmp_path / "plain")

    calls = []

    def validate(step):  # draws from every generator the run uses
        calls.append(step)
        return {"loss": float(torch.rand(()) + random.random() + np.random.rand()), "CIDEr": 0.5}

    model, loader = make(dropout=0.2)
    run = train(model, loader, quiet(max_steps=8, eval_every=3), tmp_path / "val", validate=validate)
    assert run.losses == plain.losses and calls == [3, 6]
    rows = list(csv.DictReader((tmp_path / "val" / "eval_metrics.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["3", "6"] and set(rows[0]) == {"step", "loss", "CIDEr"}


def test_console_lines_every_log_every_steps(tmp_path, capsys):
    model, loader = make()
    train(model, loader, quiet(max_steps=10, log_every=4), tmp_path)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["4/10", "8/10", "10/10"]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert f"loss {float(rows[3]['loss']):.4f}" in lines[0]
    assert "samples/s" in lines[0] and "ETA" in lines[0] and " lr " in lines[0]


def test_resume_is_logged(tmp_path, capsys):
    model, loader = make()
    train(model, loader, quiet(max_steps=6), tmp_path, stop_after=2)
    model, loader = make()
    train(model, loader, quiet(max_steps=6), tmp_path)
    assert "resuming from step 2 of 6 (checkpoint " in capsys.readouterr().out


@pytest.mark.slow
def test_cli_sigint_exits_130_with_a_resume_line_and_the_rerun_gives_the_same_adapter(tmp_path):
    """A real Ctrl-C (SIGINT) to ``python -m vlm.cli train`` mid-run: no traceback, exit 130, one line
    saying how to resume, a checkpoint at the interrupted step; the re-run's adapter is bit-identical
    to an uninterrupted run's."""
    import subprocess
    import time
    from pathlib import Path

    from safetensors.torch import load_file
    from test_cli import tiny_train_command

    root = Path(__file__).resolve().parents[1]
    common = [*tiny_train_command(tmp_path), "train.max_steps=200", "train.checkpoint_every=50"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    subprocess.run([*common, f"output_dir={tmp_path / 'full'}"], check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([*common, f"output_dir={cut}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not list((cut / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the first cadence checkpoint: training is under way
    proc.send_signal(signal.SIGINT)
    out, err = (s.decode() for s in proc.communicate(timeout=300))
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(x for x in out.splitlines() if "stopped by SIGINT" in x)
    step = int(line.split("at step ")[1].split()[0])
    assert 50 <= step < 200 and "To resume, run the same command again." in line
    assert latest_checkpoint(cut).name == f"step_{step:07d}" and str(latest_checkpoint(cut)) in line

    again = subprocess.run([*common, f"output_dir={cut}"], check=True, env=env, capture_output=True, text=True)
    assert f"resuming from step {step} of 200" in again.stdout
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
