"""Two CPU processes (torchrun, gloo): replicas stay bit-identical and match one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import make, quiet

from vlm.training import train

TESTS = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import make, quiet
    from vlm.distributed import init_distributed
    from vlm.training import train
    rank, world = init_distributed()
    assert world == 2, world
    torch.manual_seed(1000 + rank)  # different initial weights per rank: the loop must broadcast rank 0's
    model, loader = make(dropout=0.0, batch=4)
    if rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5)
    result = train(model, loader, quiet(max_steps={steps}, max_grad_norm=0.5, checkpoint_every=3), {out!r}, stop_after={stop})
    torch.save({{"params": {{n: p for n, p in model.named_parameters() if p.requires_grad}}, "losses": result.losses}},
               {out!r} + f"/rank{{rank}}.pt")
    """
)


def run_torchrun(tmp_path: Path, steps: int, stop: int | None = None, name: str = "run") -> list[dict]:
    script = tmp_path / "worker.py"
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    script.write_text(WORKER.format(tests=str(TESTS), steps=steps, out=str(out), stop=stop))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _env():
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    return env


def test_two_processes_keep_identical_replicas_and_match_one_process(tmp_path):
    ranks = run_torchrun(tmp_path, steps=6)
    for name, p0 in ranks[0]["params"].items():
        assert torch.equal(p0, ranks[1]["params"][name]), name  # replicas bit-identical
    assert ranks[0]["losses"] == ranks[1]["losses"]  # both log the mean over ranks

    model, loader = make(dropout=0.0, batch=8)  # one process, the same global batch of 8
    single = train(model, loader, quiet(max_steps=6, max_grad_norm=0.5), tmp_path / "single")
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ranks[0]["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_stop_and_resume_match_uninterrupted(tmp_path):
    full = run_torchrun(tmp_path, steps=6, name="full")
    first = run_torchrun(tmp_path, steps=6, stop=3, name="cut")
    second = run_torchrun(tmp_path, steps=6, name="cut")
    assert len(second[0]["losses"]) == 3
    assert first[0]["losses"] + second[0]["losses"] == full[0]["losses"]  # exact
    for name, p in full[0]["params"].items():
        assert torch.equal(second[0]["params"][name], p), name
        assert torch.equal(second[1]["params"][name], p), name
