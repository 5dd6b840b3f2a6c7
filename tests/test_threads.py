"""`vlm.threads`: what ``threads: 0`` (auto) picks from the kernel's CPU counters, and where it defers."""

from __future__ import annotations

import pytest
import torch

from vlm import threads as threads_mod
from vlm.threads import busy_cores, choose_threads, set_threads


def _stat(path, idle, total):
    # user nice system idle iowait irq softirq steal: idle jiffies in 'idle', the rest in 'user'
    path.write_text(f"cpu  {total - idle} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")


def test_busy_cores_reads_the_aggregate_line_twice(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    _stat(stat, idle=1000, total=2000)
    samples = iter([(1000, 2000), (1150, 2200)])  # 200 jiffies later, 150 of them idle
    monkeypatch.setattr(threads_mod, "_cpu_times", lambda path: next(samples))
    monkeypatch.setattr(threads_mod.os, "cpu_count", lambda: 4)
    assert busy_cores(interval=0.0, stat=stat) == pytest.approx(4 * (1 - 150 / 200))


def test_busy_cores_from_a_real_file_and_without_one(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, idle=500, total=800)
    assert busy_cores(interval=0.0, stat=stat) == 0.0  # no jiffies passed between the two reads
    assert threads_mod._cpu_times(stat) == (500, 800)
    assert busy_cores(interval=0.0, stat=tmp_path / "missing") is None
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert busy_cores(interval=0.0, stat=tmp_path / "odd") is None


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_mod, "_TORCH_DEFAULT", 4)
    monkeypatch.setattr(threads_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.parametrize(
    ("busy", "expected"),
    [(0.0, 4), (0.3, 4), (0.7, 3), (1.0, 3), (2.4, 2), (3.6, 1), (4.0, 1), (7.5, 1)],
)
def test_auto_takes_the_idle_cores_at_least_one(four_cores, busy, expected):
    threads, why = choose_threads(0, busy=busy)
    assert threads == expected
    assert why.startswith("auto:")


def test_auto_never_exceeds_torch_default(four_cores, monkeypatch):
    monkeypatch.setattr(threads_mod, "_TORCH_DEFAULT", 2)  # e.g. 4 logical cores on 2 physical ones
    assert choose_threads(0, busy=0.0)[0] == 2


def test_auto_defers_to_omp_num_threads_and_to_no_counters(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    current = torch.get_num_threads()  # the suite's one thread, not the 4 of torch's default
    assert choose_threads(0, busy=0.0) == (current, "OMP_NUM_THREADS is set")  # left as it is
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: None)
    assert choose_threads(0) == (current, "unchanged (no /proc/stat)")


def test_a_configured_count_is_taken_and_a_negative_one_refused():
    assert choose_threads(3, busy=8.0) == (3, "as configured")
    with pytest.raises(ValueError, match="threads must be >= 0"):
        choose_threads(-1)


def test_set_threads_applies_and_logs(four_cores, monkeypatch, caplog):
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: 3.0)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="vlm.threads"):
            assert set_threads(0) == 1
        assert torch.get_num_threads() == 1
        assert "threads: 1 (auto: 1 of 4 cores idle)" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_the_cli_applies_the_threads_field(monkeypatch):
    from vlm.cli import parse

    seen = []
    monkeypatch.setattr("vlm.cli.set_threads", seen.append)
    parse("demo", ["threads=2", "output_dir=unused"])
    parse("demo", ["output_dir=unused"])
    assert seen == [2, 0]  # the shipped default config asks for auto


def test_busy_cores_on_this_machine():
    busy = busy_cores(interval=0.05)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= busy <= threads_mod.os.cpu_count() + 1e-6
