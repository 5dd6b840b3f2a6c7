"""Faults during training: SIGKILL mid-step and mid-checkpoint, non-finite losses, a dead or hung peer.

Resume tolerance: 0 (bit-identical). On CPU in fp32 the resumed run's losses and weights equal the
uninterrupted run's exactly, dropout included (the checkpoint restores every RNG).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make, quiet

from vlm.training import TrainConfig, latest_checkpoint, train

TESTS = Path(__file__).parent
STEPS, EVERY = 8, 2


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _config(**kw) -> TrainConfig:
    return quiet(max_steps=STEPS, warmup_steps=2, checkpoint_every=EVERY, **kw)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# SIGKILL


KILL_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import vlm.training.state as T  # the checkpoint writer, patched below
    from vlm.training import train
    from test_faults import _config
    from test_train import make

    out, where = Path(sys.argv[1]), sys.argv[2]
    marker = out.parent / (out.name + ".marker")

    def hold():  # tell the test we are at the fault point, then wait for the SIGKILL
        marker.touch()
        time.sleep(600)

    if where == "weights_write":  # inside step 4's checkpoint: weights half done, nothing renamed yet
        write_bytes = T.write_bytes
        def slow_write(path, data):
            if "step_0000004" in str(path) and path.name == "trainable.safetensors":
                write_bytes(path, data[:10])  # as if the write was cut short
                hold()
            write_bytes(path, data)
        T.write_bytes = slow_write
    elif where == "pointer_write":  # step 4's directory renamed into place, `latest` not yet updated
        atomic_write = T.atomic_write
        def slow_pointer(path, text):
            if text == "step_0000004":
                hold()
            atomic_write(path, text)
        T.atomic_write = slow_pointer

    model, loader = make(dropout=0.2)
    if where == "mid_step":  # during step 5's forward, after step 4's checkpoint
        forward, calls = model.forward, [0]
        def counting(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:
                hold()
            return forward(*args, **kwargs)
        model.forward = counting
    train(model, loader, _config(), out)
    """
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: losses and final trainable weights."""
    model, loader = make(dropout=0.2)
    result = train(model, loader, _config(), tmp_path_factory.mktemp("ref"))
    return result.losses, _trainable(model)


def _run_and_kill(tmp_path: Path, where: str) -> Path:
    out = tmp_path / "run"
    marker = tmp_path / "run.marker"
    script = tmp_path / "kill_worker.py"
    script.write_text(KILL_WORKER)
    proc = subprocess.Popen([sys.executable, str(script), str(out), where], env=_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("worker never reached the fault point")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return out


def _check_resume(out: Path, expect_step: int, reference) -> None:
    ref_losses, ref_weights = reference
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step_{expect_step:07d}"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == expect_step
    weights = load_file(str(ckpt / "trainable.safetensors"))  # intact: loads, complete, finite
    assert sorted(weights) == state["trainable"] and all(torch.isfinite(w).all() for w in weights.values())

    model, loader = make(dropout=0.2)  # a fresh process's model and RNG
    torch.manual_seed(1234)
    result = train(model, loader, _config(), out)
    assert result.resumed_from == expect_step
    assert result.losses == ref_losses[expect_step:]  # tolerance 0: bit-identical
    for name, value in _trainable(model).items():
        assert torch.equal(value, ref_weights[name]), name
    steps = [int(r["step"]) for r in result.history]
    assert steps == list(range(1, STEPS + 1))  # metrics.csv holds one clean history
    debris = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
    assert not debris  # the killed writer's temporaries are removed by the next checkpoint write


def test_sigkill_mid_step_resumes_to_the_uninterrupted_losses(tmp_path, reference):
    out = _run_and_kill(tmp_path, "mid_step")
    _check_resume(out, 4, reference)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights_write", "pointer_write"])
def test_sigkill_during_checkpoint_write_keeps_the_last_complete_one(tmp_path, reference, where):
    out = _run_and_kill(tmp_path, where)
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    if where == "weights_write":  # a half-written temp dir is left behind and ignored
        assert any(name.startswith(".tmp_step_0000004") for name in leftovers), leftovers
        _check_resume(out, 2, reference)
    else:  # step 4 is complete but `latest` still names step 2: the newest verified step wins
        assert "step_0000004" in leftovers and (out / "checkpoints" / "latest").read_text() == "step_0000002"
        with pytest.warns(RuntimeWarning, match="latest names 'step_0000002', but the newest verified checkpoint is"):
            _check_resume(out, 4, reference)


# ----------------------------------------------------------------------------------------------
# Non-finite losses


class Poisoned:
    """Fixed list of batches; the ones at ``bad`` positions get NaN/inf inputs (a plain iterable)."""

    def __init__(self, batches: list[dict], bad: dict[int, float]) -> None:
        self.batches = [
            {k: (torch.full_like(v, bad[i]) if (i in bad and k == "x") else v) for k, v in b.items()}
            for i, b in enumerate(batches)
        ]

    def __iter__(self):
        return iter(self.batches)


def _batches(n: int) -> list[dict]:
    _, loader = make()
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    batches = _batches(12)
    bad = {3: math.nan, 7: math.inf}
    torch.manual_seed(0)
    model, _ = make()
    with pytest.warns(RuntimeWarning, match="skipped step"):
        result = train(model, Poisoned(batches, bad), quiet(max_steps=10, warmup_steps=2), tmp_path / "poisoned")
    assert result.step == 10 and result.skipped_steps == 2
    assert all(math.isfinite(v) for v in result.losses)

    model_ref, _ = make()  # same run without the two bad batches: a skip leaves no trace at all
    clean = [b for i, b in enumerate(batches) if i not in bad]
    ref = train(model_ref, clean, quiet(max_steps=10, warmup_steps=2), tmp_path / "clean")
    assert result.losses == ref.losses
    for (name, a), b in zip(model.named_parameters(), model_ref.parameters()):
        assert torch.equal(a, b), name


def test_k_non_finite_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_state(tmp_path):
    batches = _batches(12)
    bad = {i: math.nan for i in range(3, 12)}  # steps 4.. never recover
    model, _ = make()
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match=r"max_bad_steps=4.*step 3"):
        train(model, Poisoned(batches, bad), quiet(max_steps=10, max_bad_steps=4), tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_0000003"

    model_ref, _ = make()
    train(model_ref, batches[:3], quiet(max_steps=10), tmp_path / "ref", stop_after=3)  # the last good state
    saved = load_file(str(ckpt / "trainable.safetensors"))
    for name, p in model_ref.named_parameters():
        if p.requires_grad:
            assert torch.equal(saved[name], p.detach()), name
            assert torch.equal(dict(model.named_parameters())[name].detach(), p.detach()), name


def test_max_bad_steps_must_be_positive():
    with pytest.raises(ValueError, match="train.max_bad_steps"):
        TrainConfig(max_bad_steps=0)


# ----------------------------------------------------------------------------------------------
# A dead or hung peer


PEER_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from types import SimpleNamespace
    import torch
    from vlm.distributed import init_distributed
    from vlm.training import train
    from test_train import make, quiet

    rank, fault = int(os.environ["RANK"]), sys.argv[2]
    init_distributed(timeout_s=float(sys.argv[3]))
    model, loader = make(batch=4)
    forward, calls = model.forward, [0]
    def faulty(*args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            if fault == "die":
                os._exit(17)
            if fault == "nan":  # only this rank sees a NaN loss
                return SimpleNamespace(loss=forward(*args, **kwargs).loss * float("nan"))
            time.sleep(600)  # hang
        return forward(*args, **kwargs)
    model.forward = faulty
    result = train(model, loader, quiet(max_steps=6 if fault == "nan" else 50), sys.argv[1])
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"params": params, "skipped": result.skipped_steps, "losses": result.losses}, f"{sys.argv[1]}/rank{rank}.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(tmp_path: Path, fault: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "peer_worker.py"
    script.write_text(PEER_WORKER)
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "out"), fault, str(timeout_s)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=240)  # a hang here fails the test instead of the suite
        elapsed = time.monotonic() - start
        if fault == "nan":
            procs[1].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
    return subprocess.CompletedProcess(procs[0].args, procs[0].returncode, "", err), elapsed


@pytest.mark.slow
def test_when_one_of_two_processes_dies_the_other_exits_with_an_error(tmp_path):
    survivor, _ = _run_pair(tmp_path, "die", timeout_s=60)
    assert survivor.returncode != 0
    assert "Connection" in survivor.stderr or "closed" in survivor.stderr, survivor.stderr[-2000:]


@pytest.mark.slow
def test_a_hung_peer_times_out_instead_of_blocking_forever(tmp_path):
    survivor, elapsed = _run_pair(tmp_path, "hang", timeout_s=5)
    assert survivor.returncode != 0
    assert "Timed out" in survivor.stderr or "timeout" in survivor.stderr.lower(), survivor.stderr[-2000:]
    assert elapsed < 200


@pytest.mark.slow
def test_a_nan_on_one_rank_makes_every_rank_skip_the_step_together(tmp_path):
    survivor, _ = _run_pair(tmp_path, "nan", timeout_s=60)
    assert survivor.returncode == 0, survivor.stderr[-2000:]
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    assert len(ranks[0]["losses"]) == 6 and ranks[0]["losses"] == ranks[1]["losses"]
    for name, p in ranks[0]["params"].items():
        assert torch.isfinite(p).all() and torch.equal(p, ranks[1]["params"][name]), name  # replicas agree
