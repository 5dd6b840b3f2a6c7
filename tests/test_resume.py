"""Kill -> resume reproduces the uninterrupted run exactly (fp32 on CPU: bit-identical, tolerance 0)."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import make, quiet

from vlm.training import latest_checkpoint, train


def test_stop_and_resume_is_bit_identical_to_uninterrupted(tmp_path):
    # dropout makes the run depend on the restored RNG state, not only on weights and data position
    full, loader = make(dropout=0.2)
    ref = train(full, loader, quiet(max_steps=10, warmup_steps=3), tmp_path / "full")

    part, loader = make(dropout=0.2)
    first = train(part, loader, quiet(max_steps=10, warmup_steps=3, checkpoint_every=2), tmp_path / "cut", stop_after=5)
    assert first.step == 5
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000005"

    again, loader = make(dropout=0.2)  # a fresh process: new weights and RNG, same run config
    with torch.no_grad():
        for p in again.parameters():
            if p.requires_grad:  # frozen weights come from the (same) pretrained backbone
                p.add_(1.0)
    torch.manual_seed(123)
    second = train(again, loader, quiet(max_steps=10, warmup_steps=3, checkpoint_every=2), tmp_path / "cut")
    assert second.resumed_from == 5
    assert first.losses + second.losses == ref.losses  # exact
    for (name, a), b in zip(full.named_parameters(), again.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    steps = [int(r["step"]) for r in second.history]
    assert steps == list(range(1, 11))


def test_resume_ignores_incomplete_checkpoint(tmp_path):
    model, loader = make()
    train(model, loader, quiet(max_steps=4, checkpoint_every=2), tmp_path, stop_after=2)
    root = tmp_path / "checkpoints"
    (root / ".tmp_step_0000004_999").mkdir()  # a crash mid-write leaves only a temp dir
    (root / "step_0000006").mkdir()  # or a dir without state.json
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def test_resume_with_other_world_size_is_a_clear_error(tmp_path):
    model, loader = make()
    train(model, loader, quiet(max_steps=2), tmp_path)
    state_path = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_path.read_text())
    state["world_size"] = 2
    state_path.write_text(json.dumps(state))
    model, loader = make()
    try:
        train(model, loader, quiet(max_steps=4), tmp_path)
    except ValueError as err:
        assert "2 processes" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_keeps_only_the_newest_checkpoints(tmp_path):
    model, loader = make()
    train(model, loader, quiet(max_steps=8, checkpoint_every=2, keep_checkpoints=2), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000006", "step_0000008"]


class StreamingLoader:
    """An iterable with set_epoch and no state_dict, like a webdataset pipeline: resumed by replaying."""

    def __init__(self, batch: int = 8) -> None:
        from test_train import ToyData, collate

        self.data, self.collate, self.batch, self.epoch = ToyData(40), collate, batch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.epoch))
        for start in range(0, len(order), self.batch):  # 5 batches per epoch, the last one short
            yield self.collate([self.data[int(i)] for i in order[start : start + self.batch][:7]])


def test_streaming_loader_resume_replays_to_the_same_position(tmp_path):
    full, _ = make()
    ref = train(full, StreamingLoader(), quiet(max_steps=13), tmp_path / "full")
    part, _ = make()
    first = train(part, StreamingLoader(), quiet(max_steps=13), tmp_path / "cut", stop_after=7)  # mid epoch 2
    again, _ = make()
    second = train(again, StreamingLoader(), quiet(max_steps=13), tmp_path / "cut")
    assert first.losses + second.losses == ref.losses
    for a, b in zip(full.parameters(), again.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_cli_training_killed_with_sigkill_resumes_to_the_same_run(tmp_path):
    """A real `kill -9` of `python -m vlm.cli train` after a checkpoint; the rerun continues it.

    Compared with an uninterrupted run: every logged loss and every adapter weight bit-identical (fp32 CPU).
    """
    import csv
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    from safetensors.torch import load_file
    from test_cli import tiny_train_command

    root = Path(__file__).resolve().parents[1]
    common = [*tiny_train_command(tmp_path), "train.max_steps=40", "train.checkpoint_every=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    subprocess.run([*common, f"output_dir={tmp_path / 'full'}"], check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*common, f"output_dir={cut}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not (cut / "checkpoints" / "step_0000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "training ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*common, f"output_dir={cut}"], check=True, env=env, capture_output=True)

    def losses(run):
        return [(r["step"], r["loss"]) for r in csv.DictReader((run / "metrics.csv").read_text().splitlines())]

    assert losses(cut) == losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000040" / "trainable.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step_0000040" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
