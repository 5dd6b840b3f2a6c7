"""The optional Weights & Biases logger, offline (WANDB_MODE=offline): the run's metrics reach a local W&B
run, and a resumed run continues the same W&B run id."""

from __future__ import annotations

import pytest
from test_train import make, quiet

from vlm.training import train

wandb = pytest.importorskip("wandb")


def test_wandb_offline_logs_and_a_resume_keeps_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, loader = make()
    train(model, loader, quiet(max_steps=4, log_every=2, wandb=True), tmp_path, stop_after=2)
    run_id = (tmp_path / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    model, loader = make()
    train(model, loader, quiet(max_steps=4, log_every=2, wandb=True), tmp_path)
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    assert len(sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both calls, one W&B run id
