"""Two "machines" on localhost: two torchrun agents of one process each meet through the c10d rendezvous
(``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint host:port``, what a multi-node job runs on every
machine) and train the same weights as one process with the same global batch, with ddp and fsdp."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from test_fsdp import TESTS, WORKER, assert_same, env, one_process, trained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_through_c10d_rendezvous_match_one_process(tmp_path):
    jobs = [("ddp", "prefix", 2, {}, {}), ("fsdp", "prefix", 2, {"distributed": "fsdp"}, {})]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), jobs=jobs, out=str(tmp_path)))
    node = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "pvlm-test",
        str(script),
    ]  # fmt: skip
    agents = [
        subprocess.Popen(node, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-4000:]

    model, single = one_process(tmp_path, "single")
    want = trained(model)
    for kind, *_ in jobs:
        ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt") for r in range(2)]
        nodes = sorted(r["env"]["GROUP_RANK"] for r in ranks)
        assert nodes == ["0", "1"] and all(r["env"]["LOCAL_RANK"] == "0" for r in ranks)  # one process per machine
        for r, record in enumerate(ranks):
            assert_same(record["params"], want, f"{kind} node rank {r}")
        torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)


def test_launcher_is_torchrun_only_for_a_world_of_several(monkeypatch):
    from vlm.distributed import init_distributed, launcher

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher() is None and init_distributed() == (0, 1)  # a lone process joins no group
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher() is None
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun exports on every machine of a 4-process job
    assert launcher() == "torchrun"
