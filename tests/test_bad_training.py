"""Finite or nothing, and the newest verified checkpoint: the probes of issue 20 on the training side.

Each test reproduces one finding on the toy model of test_train: non-finite hyper-parameters, an
update that turns the weights into NaN, a stop checkpoint that pruned the good one, corrupt or
misleading checkpoint files, an unusable ``train.device``.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import make, quiet

import vlm.training.loop as loop
from vlm.config import LoRAConfig
from vlm.integrity import digest
from vlm.training import TrainConfig, latest_checkpoint, train
from vlm.training.optim import build_optimizer


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _steps(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


# ----------------------------------------------------------------------------------------------
# Finite hyper-parameters


@pytest.mark.parametrize("field", ["lr", "lora_lr", "max_grad_norm", "weight_decay", "eps"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_hyper_parameters_are_refused(field, value):
    with pytest.raises(ValueError, match=f"train.{field} must be a finite number"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_lora_alpha_is_refused(value):
    with pytest.raises(ValueError, match="lora.alpha must be a finite number"):
        LoRAConfig(alpha=value)


def test_non_finite_numbers_are_refused_in_yaml_overrides_too():
    from resampler.config import load_config
    from vlm.pipeline import RunConfig

    for override in ("train.lr=.nan", "train.lora_lr=.inf", "train.max_grad_norm=.nan", "model.lora.alpha=-.inf"):
        with pytest.raises(ValueError, match="must be a finite number"):
            load_config(RunConfig, None, [override])


# ----------------------------------------------------------------------------------------------
# An update that makes the weights non-finite is rolled back


class _NanLRAt:
    """``build_optimizer`` whose AdamW runs the optimizer calls in ``bad`` with a NaN learning rate:
    finite loss, finite gradients, NaN weights after the step (what ``lr=.nan`` or a corrupt
    optimizer state did)."""

    def __init__(self, bad) -> None:
        self.bad, self.calls = set(bad), 0

    def __call__(self, model, config):
        guard = self

        class NanLRAdamW(torch.optim.AdamW):
            def step(self, closure=None):
                guard.calls += 1
                if guard.calls not in guard.bad:
                    return super().step(closure)
                saved = [g["lr"] for g in self.param_groups]
                for g in self.param_groups:
                    g["lr"] = math.nan
                try:
                    return super().step(closure)
                finally:
                    for g, lr in zip(self.param_groups, saved):
                        g["lr"] = lr

        optimizer = build_optimizer(model, config)
        optimizer.__class__ = NanLRAdamW
        return optimizer


def test_a_step_that_makes_the_weights_non_finite_is_rolled_back_and_counted(tmp_path, monkeypatch):
    _, loader = make()
    batches = [b for _, b in zip(range(12), loader)]
    monkeypatch.setattr(loop, "build_optimizer", _NanLRAt({4}))
    torch.manual_seed(0)
    model, _ = make()
    with pytest.warns(RuntimeWarning, match=r"skipped step 4: the update made a parameter non-finite \(rolled back\)"):
        result = train(model, batches, quiet(max_steps=10, warmup_steps=2), tmp_path / "poisoned")
    assert result.skipped_steps == 1 and all(math.isfinite(v) for v in result.losses)
    monkeypatch.undo()

    model_ref, _ = make()  # the same run without the 4th batch: the rollback leaves no trace
    ref = train(model_ref, batches[:3] + batches[4:], quiet(max_steps=10, warmup_steps=2), tmp_path / "clean")
    assert result.losses == ref.losses
    for name, value in _weights(model_ref).items():
        assert torch.equal(_weights(model)[name], value), name


def test_a_stop_checkpoint_is_finite_and_prunes_nothing(tmp_path, monkeypatch):
    """The probe: the run went NaN, saved its NaN state as the newest checkpoint and pruned the good one."""
    monkeypatch.setattr(loop, "build_optimizer", _NanLRAt(range(6, 100)))  # from step 6 every update is NaN
    model, loader = make()
    config = quiet(max_steps=20, checkpoint_every=2, keep_checkpoints=2, max_bad_steps=3)
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match=r"stopped after step 5"):
        train(model, loader, config, tmp_path)
    assert _steps(tmp_path) == ["step_0000002", "step_0000004", "step_0000005"]  # nothing pruned by the stop
    for name in _steps(tmp_path):
        weights = load_file(str(tmp_path / "checkpoints" / name / "trainable.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), name
    assert all(torch.isfinite(p).all() for p in _weights(model).values())


def test_a_non_finite_state_is_never_written(tmp_path):
    from vlm.training.state import save_checkpoint

    model, loader = make()
    train(model, loader, quiet(max_steps=2), tmp_path)
    with torch.no_grad():
        model.connector[0].weight[0, 0] = math.nan
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = build_optimizer(model, quiet())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    from vlm.training.batches import BatchStream

    with pytest.raises(FloatingPointError, match="not saving a checkpoint of step 3: 1 weight or optimizer values"):
        save_checkpoint(tmp_path, 3, trainable, optimizer, scheduler, scaler, BatchStream(loader), quiet(), None)
    assert _steps(tmp_path) == ["step_0000002"]


# ----------------------------------------------------------------------------------------------
# Resume takes the newest verified checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, loader = make(dropout=0.2)
    result = train(model, loader, quiet(max_steps=6, warmup_steps=2), tmp_path_factory.mktemp("ref"))
    return result.losses, _weights(model)


def _run_to(out, steps: int) -> None:
    model, loader = make(dropout=0.2)
    train(
        model, loader, quiet(max_steps=6, warmup_steps=2, checkpoint_every=2, keep_checkpoints=3), out, stop_after=steps
    )


def _resume(out, uninterrupted, expect: int) -> None:
    model, loader = make(dropout=0.2)
    torch.manual_seed(99)
    result = train(model, loader, quiet(max_steps=6, warmup_steps=2, checkpoint_every=2, keep_checkpoints=3), out)
    assert result.resumed_from == expect
    assert result.losses == uninterrupted[0][expect:]  # bit-identical continuation from that step
    for name, value in uninterrupted[1].items():
        assert torch.equal(_weights(model)[name], value), name


def _flip_bytes(path, count: int = 64, seed: int = 0) -> None:
    """Flip ``count`` bytes in the data part of a safetensors file (past its JSON header)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in random.Random(seed).sample(range(header, len(data)), count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_latest_naming_an_older_step_does_not_win_over_a_newer_one(tmp_path, uninterrupted, capsys):
    _run_to(tmp_path, 4)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002")
    with pytest.warns(RuntimeWarning, match="latest names 'step_0000002', but the newest verified checkpoint is"):
        _resume(tmp_path, uninterrupted, 4)
    printed = capsys.readouterr().out
    assert "train: resuming from step 4 of 6 (checkpoint " in printed and "step_0000004)" in printed


@pytest.mark.parametrize("damage", ["random_bytes", "directory", "symlink_out"])
def test_an_unreadable_latest_pointer_is_ignored_with_a_warning(tmp_path, uninterrupted, damage):
    _run_to(tmp_path, 4)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.unlink()
    if damage == "random_bytes":
        pointer.write_bytes(random.Random(0).randbytes(300))
    elif damage == "directory":
        pointer.mkdir()
    else:
        (tmp_path / "elsewhere").write_text("step_0000004")
        pointer.symlink_to(tmp_path / "elsewhere")
    with pytest.warns(RuntimeWarning, match="ignoring an unreadable"):
        _resume(tmp_path, uninterrupted, 4)
    assert pointer.is_file() and not pointer.is_symlink() and pointer.read_text() == "step_0000006"


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("state_garbage", "state.json is unreadable"),
        ("state_no_world_size", "'world_size' is missing"),
        ("state_list", "state.json is not a JSON object"),
        ("flip_weights", "trainable.safetensors: sha256 differs from its record"),
        ("flip_optimizer", "optimizer.pt: sha256 differs from its record"),
        ("nan_weights_recorded", "non-finite weight or optimizer values"),
        ("weights_missing", "trainable.safetensors is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_verified_one(tmp_path, uninterrupted, damage, reason):
    _run_to(tmp_path, 4)
    newest = tmp_path / "checkpoints" / "step_0000004"
    state_path = newest / "state.json"
    if damage == "state_garbage":
        state_path.write_bytes(b"{\x00\xff not json")
    elif damage == "state_no_world_size":
        state = json.loads(state_path.read_text())
        del state["world_size"]
        state_path.write_text(json.dumps(state))
    elif damage == "state_list":
        state_path.write_text("[1, 2]")
    elif damage == "flip_weights":
        _flip_bytes(newest / "trainable.safetensors")
    elif damage == "flip_optimizer":
        data = bytearray((newest / "optimizer.pt").read_bytes())
        for i in random.Random(1).sample(range(len(data) // 2, len(data)), 64):
            data[i] ^= 0xFF
        (newest / "optimizer.pt").write_bytes(bytes(data))
    elif damage == "nan_weights_recorded":  # what the old code saved as its "last good state"
        weights = load_file(str(newest / "trainable.safetensors"))
        weights["connector.0.weight"][0] = math.nan
        save_file(weights, str(newest / "trainable.safetensors"))
        state = json.loads(state_path.read_text())
        state["files"]["trainable.safetensors"] = digest((newest / "trainable.safetensors").read_bytes())
        state_path.write_text(json.dumps(state))
    else:
        (newest / "trainable.safetensors").unlink()
    with pytest.warns(RuntimeWarning, match=reason):
        _resume(tmp_path, uninterrupted, 2)


def test_every_checkpoint_records_a_sha256_and_size_per_file(tmp_path):
    model, loader = make()
    train(model, loader, quiet(max_steps=2), tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    record = json.loads((ckpt / "state.json").read_text())["files"]
    assert sorted(record) == ["optimizer.pt", "rng.pt", "trainable.safetensors"]
    for name, entry in record.items():
        assert entry == digest((ckpt / name).read_bytes()), name


def test_no_verified_checkpoint_at_all_is_a_clear_error_not_a_fresh_start(tmp_path):
    _run_to(tmp_path, 2)
    _flip_bytes(tmp_path / "checkpoints" / "step_0000002" / "trainable.safetensors")
    model, loader = make()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no checkpoint under .* verifies"):
        train(model, loader, quiet(max_steps=6), tmp_path)


# ----------------------------------------------------------------------------------------------
# train.device


@pytest.mark.parametrize("device", ["tpu", "gpu", "meta", "cuda:x"])
def test_a_device_torch_does_not_know_is_refused_by_the_config(device):
    with pytest.raises(ValueError, match=f"train.device='{device}'"):
        TrainConfig(device=device)


def test_a_device_this_machine_lacks_is_refused_before_any_step(tmp_path):
    missing = f"cuda:{torch.cuda.device_count() + 6}"  # cuda:7 on a one-GPU machine, cuda:6 on a CPU one
    model, loader = make()
    with pytest.raises(ValueError, match=f"train.device='{missing}' is not usable on this machine"):
        train(model, loader, quiet(max_steps=2, device=missing), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_explicit_device_is_honoured(tmp_path):
    model, loader = make()
    train(model, loader, quiet(max_steps=2, device="cuda:0"), tmp_path)
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_auto_keeps_a_cpu_model_on_the_cpu_here(tmp_path):
    if torch.cuda.is_available() or os.environ.get("LOCAL_RANK"):
        pytest.skip("checks the CPU-only resolution")
    model, loader = make()
    train(model, loader, quiet(max_steps=1), tmp_path)
    assert all(p.device.type == "cpu" for p in model.parameters())
